#!/usr/bin/env python3
"""Instructions and simulated cache misses per Check: the authorizer's cost measured by
counting, not timing, so an A/B is readable on a shared, noisy VM.

Run through `bench/run.sh instructions [--portcullis-b OLD]` (it builds first). Each
authorizer runs alone under valgrind's callgrind with its cache simulation: started with
instrumentation off, warmed (every token of the set sent once, so the token cache holds them
all), then, after 500 Checks that fill the simulated caches, counted over `--count` Checks sent by `bench replay` (16 in flight, one HTTP/2
connection, the `i`th Check carrying token `i mod n`), and dumped. The counts include
everything the process runs meanwhile: HTTP/2, decoding, the decision, encoding and the
audit writer thread.

Authorizers: P (this tree's release build, the benchmark's policy), Pb (with
`--portcullis-b FILE`, another build on the same config) and F (the no-op server of the
benchmark's floor). Token sets: 1 token, 10 000 distinct RS256 tokens, 10 000 of which 10%
lack the scope.

With `--envoy`, Envoy itself is counted the same way (rows EF, EP): Envoy with the shipped
gRPC wiring in front of the no-op (EF) and of Portcullis (EP), both running natively. (The
module cannot be counted so: it asks `/proc/self/exe --version` which Envoy loads it, and
under valgrind that is valgrind's own tool, so the module refuses to load.) Envoy is warmed with every token, then counted over
`--envoy-requests` requests sent by `bench open-loop` at `--envoy-rate` per second (an
instrumented Envoy keeps up with about 100/s; above that requests queue and time out). At
such a rate each request is its own event-loop wake-up, so Envoy's count per request is
higher than under a closed loop; compare the rows with each other, not with the authorizer's.

The simulated last-level cache is 2 MiB (`--ll`), the size this VM's cores keep: the
benchmark's cache-decay probe finds a working set beyond the 2 MiB L2 evicted by other
tenants within a millisecond. valgrind models no prefetching and no out-of-order overlap,
so a miss here is an upper bound on what the hardware pays; instruction counts are exact.

Repeatability: the same build counted twice differs by well under 1% (the scheduling of 16
requests in flight varies a little). Writes bench/results/<time>-<label>.{json,md}
(label `instructions` unless `--label` says otherwise).
"""
import argparse, json, os, re, subprocess, sys, time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def callgrind(name, cmd, out, ll):
    """`cmd` under callgrind, instrumentation off until `callgrind_control -i on`."""
    return h.Proc(name, ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes",
                         f"--LL={ll},16,64", f"--callgrind-out-file={out}", *cmd])


def replay(port, tokens, count):
    return json.loads(h.run(["taskset", "-c", h.LOAD_CPU, h.BENCH, "replay", "--addr",
                             f"127.0.0.1:{port}", "--tokens", tokens, "--count", str(count)]))


def wait_grpc(port, tokens, timeout=120):
    deadline = time.time() + timeout
    while True:
        try:
            return replay(port, tokens, 1)
        except subprocess.CalledProcessError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def control(pid, *args):
    h.run(["callgrind_control", *args, str(pid)])


def summary_line(path):
    with open(path) as f:
        for line in f:
            if line.startswith("summary:"):
                return dict(zip(EVENTS, map(int, line.split()[1:])))
    raise RuntimeError(f"no summary in {path}")


def last_dump(name):
    """The event totals of the newest callgrind dump of `name` (after `callgrind_control -d`)."""
    time.sleep(1)
    dumps = sorted(f for f in os.listdir(h.WORK) if f.startswith(f"callgrind.{name}.out."))
    return summary_line(os.path.join(h.WORK, dumps[-1]))


def clear_dumps(name):
    """Removes `name`'s earlier dumps; returns the path callgrind writes them to."""
    out = os.path.join(h.WORK, f"callgrind.{name}.out")
    for f in os.listdir(h.WORK):
        if f.startswith(f"callgrind.{name}.out"):
            os.remove(os.path.join(h.WORK, f))
    return out


def per_unit(ev, n, **extra):
    """Per-request figures from event totals over `n` requests, with the usual cachegrind
    cost model (an L1 miss ~10 instructions, an LL miss ~100) as `est_cycles`."""
    per = {k: v / n for k, v in ev.items()}
    r = {"Ir": round(per["Ir"]), "L1_misses": round(per["I1mr"] + per["D1mr"] + per["D1mw"], 1),
         "LL_misses": round(per["ILmr"] + per["DLmr"] + per["DLmw"], 1), **extra}
    r["est_cycles"] = round(per["Ir"] + 10 * r["L1_misses"] + 100 * r["LL_misses"])
    return r


def measure(name, cmd, port, tokens, count, ll, ready):
    """One authorizer, one token set: warm, then count `count` Checks. Per-Check figures."""
    out = clear_dumps(name)
    proc = callgrind(f"callgrind-{name}", cmd, out, ll)
    try:
        ready()
        n_tokens = sum(1 for _ in open(tokens))
        warm = replay(port, tokens, max(n_tokens, 1000))
        # Instrumentation on, a few hundred Checks to fill the simulated caches, then a dump
        # (which zeroes the counters): only the Checks after it are counted.
        control(proc.pid, "-i", "on")
        replay(port, tokens, 500)
        control(proc.pid, "-d")
        sent = replay(port, tokens, count)
        control(proc.pid, "-d")
        ev = last_dump(name)
    finally:
        proc.stop()
    r = per_unit(ev, count, allowed=sent["allowed"], denied=sent["denied"],
                 warm_allowed=warm["allowed"])
    h.log(f"{name}: {r}")
    return r


def measure_envoy(name, cfg, tokens, requests, rate, ll):
    """Envoy (`--concurrency 1`) under callgrind: warmed with every token, then `requests`
    requests at `rate`/s counted. Per-request figures."""
    out = clear_dumps(name)
    listen = cfg["listen"]
    proc = callgrind(f"callgrind-{name}", [h.envoy_bin(), "-c", cfg["path"], "--concurrency", "1",
                                           "--log-level", "warn", "--base-id", str(listen)],
                     out, ll)
    try:
        h.wait_http(listen, "/healthz", ["200", "401", "403"], timeout=180)
        n_tokens = sum(1 for _ in open(tokens))

        def load(rate_, secs):
            return json.loads(h.run(["taskset", "-c", h.LOAD_CPU, h.BENCH, "open-loop", "--addr",
                                     f"127.0.0.1:{listen}", "--tokens", tokens, "--rate", str(rate_),
                                     "--duration", str(secs)]))
        load(400, max(n_tokens, 2000) / 400)
        # As for the authorizer: the first seconds with instrumentation on (while valgrind
        # instruments Envoy's code again and the simulated caches fill) are dumped apart.
        control(proc.pid, "-i", "on")
        load(rate, 5)
        control(proc.pid, "-d")
        got = load(rate, requests / rate)
        control(proc.pid, "-d")
        ev = last_dump(name)
    finally:
        proc.stop()
    r = per_unit(ev, max(1, got["ok"] + got["non2xx"]), allowed=got["ok"],
                 denied=got["non2xx"], errors=got["errors"])
    h.log(f"{name}: {r}")
    return r


def envoy_rows(a, sets, p_port, noop_port):
    """EF and EP for each token set."""
    _, authz_filter, _ = h.shipped()
    filters = {"EF": ([authz_filter], noop_port), "EP": ([authz_filter], p_port)}
    rows = []
    for s in a.sets.split(","):
        for name, (f, port) in filters.items():
            listen = h.free_port()
            path = h.envoy_config(f"instr-{name}", listen, h.free_port(), f, port)
            r = measure_envoy(f"{name}-{s}", {"listen": listen, "path": path}, sets[s],
                              a.envoy_requests, a.envoy_rate, a.ll)
            r.update(who=name, tokens=s)
            rows.append(r)
    return rows


def render(res):
    m = res["meta"]
    L = [f"Machine: {m['machine']}; {m['date']}",
         f"Arguments: {json.dumps(m['args'])}", "",
         f"### Per Check, counted under callgrind ({m['args']['count']} Checks after a warm-up; "
         f"simulated LL {m['args']['ll'] // 1024} KiB)", "",
         "| authorizer | tokens | instructions | L1 misses | LL misses | est. cycles (Ir + 10 L1 + 100 LL) | allowed / denied |",
         "|---|---|---:|---:|---:|---:|---|"]
    for r in res["runs"]:
        L.append(f"| {r['who']} | {r['tokens']} | {r['Ir']} | {r['L1_misses']} | {r['LL_misses']} "
                 f"| {r['est_cycles']} | {r['allowed']} / {r['denied']} |")
    envoy = res.get("envoy") or []
    if envoy:
        ea = m["args"]
        L += ["", f"### Envoy per request, counted under callgrind ({ea['envoy_requests']} requests at "
              f"{ea['envoy_rate']}/s after a warm-up; the authorizer runs natively)", "",
              "| Envoy | tokens | instructions | L1 misses | LL misses | est. cycles | 2xx / other |",
              "|---|---|---:|---:|---:|---:|---|"]
        for r in envoy:
            L.append(f"| {r['who']} | {r['tokens']} | {r['Ir']} | {r['L1_misses']} | {r['LL_misses']} "
                     f"| {r['est_cycles']} | {r['allowed']} / {r['denied']} |")
    ratios = res["ratios"]
    if ratios:
        L += ["", "### Ratios (instructions; estimated cycles)", "",
              "| ratio | " + " | ".join(h.SETS) + " |", "|---|" + "---:|" * len(h.SETS)]
        for name, row in ratios.items():
            L.append(f"| {name} | " + " | ".join(
                f"{row[s]['Ir']}; {row[s]['est_cycles']}" if s in row else "" for s in h.SETS) + " |")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000, help="Checks counted per authorizer and token set")
    ap.add_argument("--ll", type=int, default=2 * 1024 * 1024, help="simulated last-level cache, bytes")
    ap.add_argument("--portcullis-b", help="another build of the portcullis binary, counted as Pb")
    ap.add_argument("--sets", default=",".join(h.SETS), help="token sets: 1,10k,mix")
    ap.add_argument("--only", default="P,Pb,F", help="authorizers: P,Pb,F")
    ap.add_argument("--envoy", action="store_true",
                    help="also count Envoy: EF (to the no-op), EP (to Portcullis)")
    ap.add_argument("--envoy-requests", type=int, default=1800)
    ap.add_argument("--envoy-rate", type=int, default=30, help="requests/s while Envoy is counted")
    ap.add_argument("--label", default="instructions")
    ap.add_argument("--render", metavar="JSON", help="print the report of a finished run and exit")
    a = ap.parse_args()
    if a.render:
        sys.stdout.write(render(json.load(open(a.render))))
        return
    os.makedirs(h.WORK, exist_ok=True)
    sets, _ = h.setup(10000)
    port, admin = h.free_port(), h.free_port()
    config = h.portcullis_config("instr", port, admin)

    def portcullis_ready():
        h.wait_http(admin, "/readyz", ["200"], timeout=120)

    who = {"P": (h.PORTCULLIS, portcullis_ready)}
    if a.portcullis_b:
        who["Pb"] = (os.path.abspath(a.portcullis_b), portcullis_ready)
    runs = []
    for s in a.sets.split(","):
        for name in [w for w in a.only.split(",") if w in who or w == "F"]:
            if name == "F":
                cmd = [h.BENCH, "noop", "--listen", f"127.0.0.1:{port}"]
                ready = lambda: wait_grpc(port, sets[s])  # noqa: E731
            else:
                binary, ready = who[name]
                cmd = [binary, "serve", "--config", config]
            r = measure(f"{name}-{s}", cmd, port, sets[s], a.count, a.ll, ready)
            r.update(who=name, tokens=s)
            runs.append(r)

    envoy = []
    if a.envoy:
        # The authorizers run natively here, so only Envoy is counted.
        noop_port, p_port, p_admin = h.free_port(), h.free_port(), h.free_port()
        natives = [h.Proc("instr-noop", [h.BENCH, "noop", "--listen", f"127.0.0.1:{noop_port}"]),
                   h.Proc("instr-portcullis", [h.PORTCULLIS, "serve", "--config",
                                               h.portcullis_config("instr-p", p_port, p_admin)])]
        try:
            h.wait_http(p_admin, "/readyz", ["200"])
            envoy = envoy_rows(a, sets, p_port, noop_port)
        finally:
            for p in natives:
                p.stop()

    def get(w, s):
        return next((r for r in runs + envoy if r["who"] == w and r["tokens"] == s), None)

    ratios = {}
    for num, den in (("P", "F"), ("P", "Pb"), ("EP", "EF")):
        row = {}
        for s in h.SETS:
            x, y = get(num, s), get(den, s)
            if x and y:
                row[s] = {k: round(x[k] / y[k], 3) for k in ("Ir", "est_cycles")}
        if row:
            ratios[f"{num}/{den}"] = row
    res = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": h.run(["uname", "-sr"]).strip(), "args": vars(a)},
           "runs": runs, "envoy": envoy, "ratios": ratios}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(h.ROOT, "bench", "results", f"{stamp}-{a.label}")
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(render(res))
    sys.stdout.write(render(res))
    h.log(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
