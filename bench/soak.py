#!/usr/bin/env python3
"""Soak: Portcullis inside Envoy (the module, envoy/envoy-module.yaml's filter) under
sustained load where every decision waits on a real Redis, for as long as you ask.

Run through `bench/run.sh soak [--minutes 30]` (it installs the tools and Redis and builds
first). Envoy `--concurrency 1` on CPU 1 with the benchmark's policy and a `direct_response`
upstream, wrk (64 connections) and redis-server on CPU 0. The Portcullis config adds a
per-subject rate limit on the benchmarked route stored in Redis, so each decision is held
while Redis answers and resumed through Envoy's scheduler; the 10 000 tokens (10% without
the scope) each come round about twice a second against a limit of one a second, so the
answers mix 200, 403 and 429. wrk runs back to back in slices of `--slice` seconds, and
every slice's end leaves requests in flight (clients leaving mid-wait).

Each slice records requests/s, the answers Envoy counted by class, Envoy's and Redis's RSS,
Envoy's allocator figures (its admin /memory: the module allocates through Envoy's tcmalloc)
and the module's decisions by reason (its admin /metrics). At the end it checks what a soak
is for: Envoy still serving, no 5xx, no decision that failed (`internal_error`,
`state_unavailable`, `audit_unavailable`), no error lines in Envoy's log, and Envoy's RSS over the second half of
the run not growing beyond noise. Writes bench/results/<time>-soak.{json,md}; exits 1 when a
check fails.
"""
import argparse, json, os, re, subprocess, sys, time, urllib.request
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

LIMIT = {"id": "soak-per-subject", "by": "subject", "requests": 60, "per": "1m", "burst": 1,
         "routes": ["orders-read"]}


def metrics(port):
    """The module's decision counters: {(result, status, reason): count}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for m in re.finditer(r'^portcullis_decisions_total\{result="(\w+)",status="(\d+)",'
                         r'reason="(\w+)"[^}]*\} (\d+)', text, re.M):
        key = f"{m.group(1)} {m.group(2)} {m.group(3)}"
        out[key] = out.get(key, 0) + int(m.group(4))
    return out


def envoy_stats(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?filter=^http.ingress.downstream_rq_[1-5]xx$",
                                  timeout=5).read().decode()
    return {k.rsplit("_", 1)[1]: int(v) for k, v in re.findall(r"^(\S+): (\d+)$", text, re.M)}


def envoy_memory(port):
    """Envoy's allocator (tcmalloc; the module allocates through it too): bytes in use, heap,
    thread caches and free pages."""
    m = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/memory", timeout=5).read())
    return {k: int(m[k]) for k in ("allocated", "heap_size", "total_thread_cache", "pageheap_free")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--slice", type=int, default=30, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--label", default="soak")
    ap.add_argument("--module", metavar="SO", help="soak this build of module/ (a .so) instead of "
                    "this tree's release build (to compare builds: same machine, one after the other)")
    ap.add_argument("--max-ttl", default="5m", help="the token cache's max_ttl (default 5m, as the "
                    "benchmarks): shorter turns the cache over more often, to find what grows per turn")
    ap.add_argument("--render", metavar="JSON", help="print the report of a finished soak and exit")
    a = ap.parse_args()
    if a.render:
        sys.stdout.write(render(json.load(open(a.render))))
        return
    import yaml

    os.makedirs(h.WORK, exist_ok=True)
    sets, _ = h.setup(10000)
    envoy = h.envoy_bin()
    procs = []
    try:
        redis_port = h.free_port()
        redis = h.Proc("soak-redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], cpu=h.LOAD_CPU)
        procs.append(redis)
        admin = h.free_port()
        path = h.portcullis_config("soak", h.free_port(), admin)
        cfg = yaml.safe_load(open(path))
        cfg["state"] = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                        "key_prefix": "soak:", "timeout": "200ms"}
        cfg["rate_limits"] = [LIMIT]
        cfg["audit"] = {"enabled": False}  # a 30-minute audit log is not what is measured
        cfg["tokens"]["cache"]["max_ttl"] = a.max_ttl
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        lp, envoy_admin = h.free_port(), h.free_port()
        ecfg = h.envoy_config("soak", lp, envoy_admin,
                              [h.module_filter(path, a.module and os.path.abspath(a.module))])
        e = h.Proc("soak-envoy", [envoy, "-c", ecfg, "--concurrency", "1", "--log-level", "warn",
                                  "--base-id", str(lp)], env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": h.REL})
        procs.append(e)
        h.wait_http(lp, "/healthz", ["200"])
        h.wait_http(admin, "/readyz", ["200"])
        tok = open(sets["mix"]).readline().strip()
        first = (h.http_status(lp, tok), h.http_status(lp, tok))
        if first != (200, 429):
            raise RuntimeError(f"the same subject twice answered {first}, expected (200, 429)")

        slices = []
        started = time.time()
        deadline = started + a.minutes * 60
        h.log(f"soak: {a.minutes} min in {a.slice} s slices, {a.conns} connections")
        while time.time() < deadline:
            secs = max(1, min(a.slice, int(deadline - time.time())))
            r = h.wrk(lp, sets["mix"], secs, a.conns)
            s = {"t": round(time.time() - started), "rps": r["rps"], "requests": r["requests"],
                 "socket_errors": r["socket_errors"],
                 "envoy_rss_kib": e.rss_kib()["VmRSS"], "redis_rss_kib": redis.rss_kib()["VmRSS"],
                 "answers": envoy_stats(envoy_admin), "decisions": metrics(admin),
                 "envoy_memory": envoy_memory(envoy_admin)}
            slices.append(s)
            h.log(f"  t={s['t']:5d}s {s['rps']:8.0f}/s envoy {s['envoy_rss_kib'] / 1024:6.1f} MiB "
                  f"redis {s['redis_rss_kib'] / 1024:5.1f} MiB answers {s['answers']}")
        alive = h.http_status(lp, tok) in (200, 429)
        log_text = open(os.path.join(h.WORK, "soak-envoy.log")).read()
    finally:
        for p in reversed(procs):
            p.stop()

    last = slices[-1]
    half = slices[len(slices) // 2:]
    rss = [s["envoy_rss_kib"] for s in half]
    growth = (rss[-1] - rss[0]) / rss[0] if rss[0] else 0
    failed = {k: v for k, v in last["decisions"].items()
              if k.endswith((" internal_error", " state_unavailable", " audit_unavailable"))}
    errors = [line for line in log_text.splitlines()
              if re.search(r'\[(error|critical)\]|"level":"ERROR"|panicked', line)]
    checks = {
        "Envoy serves after the run": alive,
        "no 5xx answers": last["answers"].get("5xx", 0) == 0,
        "no failed decisions (internal_error, state_unavailable, audit_unavailable)": not failed,
        "no error lines in Envoy's log": not errors,
        "Envoy RSS over the second half grows < 5%": growth < 0.05,
    }
    res = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "envoy": h.run([envoy, "--version"]).strip().split("version:")[-1].strip(),
                    "args": vars(a), "limit": LIMIT},
           "slices": slices, "second_half_rss_growth": round(growth, 4), "failed": failed,
           "error_lines": errors[:20], "checks": checks}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(h.ROOT, "bench", "results", f"{stamp}-{a.label}")
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(render(res))
    h.log(f"wrote {out}.json and .md")
    print(render(res))
    sys.exit(0 if all(checks.values()) else 1)


def render(res):
    s = res["slices"]
    args = res["meta"]["args"]
    # Recorded since the refresh-ahead memory probe (2026-12-02); older runs have no column.
    heap = all("envoy_memory" in x for x in s)
    total = sum(x["requests"] for x in s)
    build = (f"module {args['module']}, " if args.get("module") else "") + \
        (f"cache max_ttl {args['max_ttl']}, " if args.get("max_ttl", "5m") != "5m" else "")
    lines = [f"# Soak: the module under load, every decision waiting on Redis ({res['meta']['date']})", "",
             f"Envoy {res['meta']['envoy']}; {args['minutes']} min, {build}"
             f"{args['conns']} connections, 10 000 tokens (10% without the scope), "
             f"limit `{res['meta']['limit']['id']}`: 1/s per subject, burst 1, on Redis.", "",
             f"{total} requests; answers by class at the end: {s[-1]['answers']}; decisions: "
             f"{s[-1]['decisions']}.", "",
             "| t (s) | requests/s | Envoy RSS MiB | Redis RSS MiB | socket errors |"
             + (" Envoy heap MiB: in use / heap / thread caches / free pages |" if heap else ""),
             "|---:|---:|---:|---:|---|" + ("---|" if heap else "")]
    for x in s:
        lines.append(f"| {x['t']} | {x['rps']:.0f} | {x['envoy_rss_kib'] / 1024:.1f} | "
                     f"{x['redis_rss_kib'] / 1024:.1f} | {x['socket_errors'] or '-'} |"
                     + (" " + " / ".join(f"{x['envoy_memory'][k] / 2**20:.1f}" for k in
                                          ("allocated", "heap_size", "total_thread_cache",
                                           "pageheap_free")) + " |" if heap else ""))
    lines += ["", f"Envoy RSS growth over the second half: {res['second_half_rss_growth'] * 100:.2f}%", "",
              "| check | |", "|---|---|"]
    for k, v in res["checks"].items():
        lines.append(f"| {k} | {'✓' if v else '✗'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
