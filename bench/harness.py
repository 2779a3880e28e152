#!/usr/bin/env python3
"""Portcullis benchmark orchestrator (run it through bench/run.sh, which builds and installs).

Scenarios (same route, grants and token sets; Envoy --concurrency 1; direct_response upstream):
  S1   Envoy, no auth
  S2   Envoy jwt_authn (local JWKS) + rbac, Envoy defaults
  S2c  S2 with jwt_cache_config sized to the token set
  F    Envoy ext_authz (the wiring shipped in envoy/envoy.yaml) to a no-op server: the hop's floor
  P    Envoy ext_authz (same wiring) to Portcullis with a realistic policy
  Pd   P with the pre-bench wiring (no allowed_headers): measures the allowed_headers lever
  Fu   F over a Unix domain socket instead of loopback TCP: measures the UDS lever
  Fx   F whose allow carries the identity headers P's allow carries (subject, scopes): the
       floor of the hop for an authorizer that tells the upstream who is calling
  Fh   Envoy's HTTP ext_authz API (the wiring shipped in envoy/envoy-http.yaml) to a no-op
       HTTP server: the floor of the HTTP hop
  Ph   the same HTTP wiring to Portcullis's HTTP ext_authz listener (`server.http_listen`)
  M    no hop: Portcullis's decision inside Envoy as an HTTP dynamic module (module/, the
       wiring of envoy/envoy-module.yaml), same policy, identity headers and deny answers
  Mb   with --module-b FILE only: M with another build of the module (same-run A/B)
  Pb   with --portcullis-b FILE only: P with another build of Portcullis (same-run A/B)
Scenarios M and P run this tree's release builds unless --module-a/--portcullis-a name others.
A/B ratios are only as good as an A/A: the same build as both sides measured M/Mb 0.956-0.988
and P/Pb 0.978-0.989, B ahead in all six (bench/results/20261201T235045Z-aa.*). Rerun an A/B
with the roles swapped (--portcullis-a OLD --portcullis-b NEW) and take the geometric mean of
A/B and 1/(swapped A/B); differences of a few percent stay within the noise even then.
Token sets: 1 token, 10 000 distinct (rotated per request), 10 000 with 10% denials
(`--tokens N` for another count; the raw results keep the key "10k", the tables name N).
Load generator on CPU 0, system under test (Envoy + authz server) on CPU 1.
"""
import argparse, json, os, random, re, shutil, socket, statistics, subprocess, sys, time
import urllib.request
from datetime import datetime, timezone

# PyYAML (bench/run.sh installs it) is imported where configs are read or written, so that
# `--render` runs on the standard library alone (tests/bench_harness.rs runs it in CI).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "bench")
REL = os.path.join(ROOT, "target", "release")
PORTCULLIS = os.path.join(REL, "portcullis")
MODULE = "portcullis_envoy_module"  # target/release/libportcullis_envoy_module.so (module/)
BENCH = os.path.join(REL, "examples", "bench")
LOAD_CPU, SUT_CPU = "0", "1"
AUD = "bench-api"
ISS = {a: f"https://{a.lower()}.bench.invalid" for a in ("RS256", "PS256", "ES256", "EdDSA")}
KEYFILE = {"RS256": "rsa.pem", "PS256": "rsa.pem", "ES256": "ec.pem", "EdDSA": "ed.pem"}
KID = {"RS256": "rs", "PS256": "ps", "ES256": "es", "EdDSA": "ed"}
PATH = "/orders/42"
SETS = ["1", "10k", "mix"]
OPEN_SCENARIOS = ["S1", "S2", "S2c", "F", "P", "Ph", "M"]
# Same-run A/B sides (--module-b, --portcullis-b): run closed and open loop when present.
AB_SCENARIOS = ["Mb", "Pb"]
# Scenarios whose added p99 is also measured interleaved with S1 (phase `paired`).
PAIRED = ["P", "M", "Pb", "Mb"]
# Added p99 at 50% of S2's rate (scenario minus S1), by summary key.
ADDED_P99 = (("P", "added_p99_us_at_50"), ("Ph", "added_p99_us_at_50_http"),
             ("M", "added_p99_us_at_50_module"), ("Mb", "added_p99_us_at_50_module_b"),
             ("Pb", "added_p99_us_at_50_b"))
# Ratios reported (computed within each round).
PAIRS = [("P", "F"), ("P", "Fx"), ("Fx", "F"), ("P", "S2"), ("P", "S2c"), ("F", "S2"), ("F", "S2c"), ("P", "S1"), ("S2", "S1"),
         ("P", "Pd"), ("Fu", "F"), ("Fh", "F"), ("Fh", "S2"),
         ("Ph", "Fh"), ("Ph", "S2"), ("Ph", "S2c"), ("Ph", "P"),
         ("M", "S2"), ("M", "S2c"), ("M", "P"), ("M", "S1"), ("M", "Mb"), ("P", "Pb")]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


_GIVEN = set()


def _ports_below_ephemeral():
    """Ports no kernel-chosen port falls in: from 20000 (or less if the ephemeral range starts
    lower) up to the start of the ephemeral range. Empty if there is no room."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        eph_low = 32768
    high = eph_low - 1
    return max(min(20000, high // 2), 1024), high


def free_port():
    """A loopback port nothing listens on, never the same one twice in a run, from below the
    kernel's ephemeral range: a port from bind(0) can be handed out again (to another bind(0)
    or an outgoing connection of any process) before the process it was meant for binds it,
    and a run starts a dozen processes that each bind several. bind(0) is the fallback where
    the ephemeral range leaves no room below it."""
    low, high = _ports_below_ephemeral()
    if high > low:
        span = high - low
        seed = (os.getpid() * 2654435761) % span
        for i in range(span):
            p = low + (seed + i) % span
            if p in _GIVEN:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            finally:
                s.close()
            _GIVEN.add(p)
            return p
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in _GIVEN:
            _GIVEN.add(p)
            return p


def envoy_bin():
    e = os.environ.get("PORTCULLIS_ENVOY")
    if e:
        return e
    local = os.path.join(ROOT, ".tools/envoy/envoy/_bin/envoy")
    if not os.access(local, os.X_OK):
        return run([os.path.join(ROOT, "scripts/install-envoy.sh")]).strip().splitlines()[-1]
    return local


# ---------------------------------------------------------------- setup: keys, tokens, configs

def setup(n_tokens):
    keys = os.path.join(WORK, "keys")
    os.makedirs(keys, exist_ok=True)
    gen = {"rsa.pem": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
           "ec.pem": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
           "ed.pem": ["-algorithm", "ED25519"]}
    for name, args in gen.items():
        p = os.path.join(keys, name)
        if not os.path.exists(p):
            # Benchmark-only keys, made fresh on each machine and never committed.
            run(["openssl", "genpkey", *args, "-out", p])
    for alg in ISS:
        run([BENCH, "jwks", "--key", os.path.join(keys, KEYFILE[alg]), "--alg", alg,
             "--kid", KID[alg], "--out", os.path.join(keys, f"{KID[alg]}.jwks.json")])
    tok = os.path.join(WORK, "tokens")
    os.makedirs(tok, exist_ok=True)

    def tokens(alg, count, name, deny_every=None):
        out = os.path.join(tok, name)
        stamp = out + f".{count}"
        if os.path.exists(stamp) and os.path.getmtime(stamp) > time.time() - 3 * 3600:
            return out
        cmd = [BENCH, "tokens", "--key", os.path.join(keys, KEYFILE[alg]), "--alg", alg,
               "--kid", KID[alg], "--issuer", ISS[alg], "--audience", AUD,
               "--count", str(count), "--out", out]
        if deny_every:
            cmd += ["--deny-every", str(deny_every)]
        run(["taskset", "-c", LOAD_CPU, *cmd])
        open(stamp, "w").close()
        return out

    log(f"setup: signing tokens ({n_tokens} distinct RS256, twice)")
    sets = {"1": tokens("RS256", 1, "rs_1.txt"),
            "10k": tokens("RS256", n_tokens, "rs_10k.txt"),
            "mix": tokens("RS256", n_tokens, "rs_mix.txt", deny_every=10)}
    reqs = {}
    for alg in ISS:
        t = tokens(alg, 1, f"{KID[alg]}_1.txt")
        r = os.path.join(tok, f"{KID[alg]}_1.grpc")
        run([BENCH, "grpc-request", "--tokens", t, "--path", PATH, "--out", r])
        reqs[alg] = (t, r)
    return sets, reqs


def routes():
    """A realistic policy: the benchmarked route among dozens of others, with scopes, roles
    and resource binding. The RBAC scenarios get one policy per route (scope-based: RBAC
    cannot bind a path segment to a claim)."""
    r = [{"id": "healthz", "methods": ["GET"], "path": "/healthz", "public": True},
         {"id": "orders-read", "methods": ["GET"], "path": "/orders/{id}",
          "rules": [{"id": "orders-reader", "scopes": ["orders:read"]}]},
         {"id": "orders-create", "methods": ["POST"], "path": "/orders",
          "rules": [{"id": "orders-writer", "scopes": ["orders:write"]}]},
         {"id": "user-profile", "methods": ["GET", "PUT"], "path": "/users/{user}/profile",
          "rules": [{"id": "own-profile", "bind": [{"param": "user", "equals_claim": "sub"}]}]},
         {"id": "tenant-resources", "methods": ["GET", "POST", "PUT", "DELETE"],
          "path": "/tenants/{tenant}/**",
          "rules": [{"id": "tenant-member", "bind": [{"param": "tenant", "in_claim": "tenants"}]}]},
         {"id": "admin", "methods": ["GET", "POST", "PUT", "PATCH", "DELETE"], "path": "/admin/**",
          "rules": [{"id": "admin-role", "roles": ["admin"]}]}]
    for k in range(12):
        svc = f"svc{k}"
        r.append({"id": f"{svc}-list", "methods": ["GET"], "path": f"/{svc}/items",
                  "rules": [{"id": f"{svc}-reader", "scopes": [f"{svc}:read"]}]})
        r.append({"id": f"{svc}-item", "methods": ["GET", "PUT", "DELETE"], "path": f"/{svc}/items/{{id}}",
                  "rules": [{"id": f"{svc}-writer", "scopes": [f"{svc}:write"]},
                            {"id": f"{svc}-admin", "roles": ["admin"]}]})
        r.append({"id": f"{svc}-owned", "methods": ["GET"], "path": f"/{svc}/users/{{user}}/items/*",
                  "rules": [{"id": f"{svc}-owner", "scopes": [f"{svc}:read"],
                             "bind": [{"param": "user", "equals_claim": "sub"}]}]})
    return r


CACHE_MAX_MIB = 64  # tokens.cache.max_bytes of every Portcullis here (the shipped default)


# The candidate policy of `--dry-run-b`: the benchmarked route needing another scope, so the
# dry run answers differently from the live policy on every request (a deny to build, log and
# count).
DRY_RUN = {"routes": [{"id": "orders-read", "methods": ["GET"], "path": "/orders/{id}",
                       "rules": [{"id": "orders-auditor", "scopes": ["orders:audit"]}]}]}


def portcullis_config(name, grpc_port, admin_port, capacity=100000, audit=True, http_port=None,
                      dry_run=False):
    keys = os.path.join(WORK, "keys")
    server = {"listen": f"127.0.0.1:{grpc_port}", "admin_listen": f"127.0.0.1:{admin_port}"}
    if http_port:
        server["http_listen"] = f"127.0.0.1:{http_port}"
    cfg = {
        "server": server,
        "tokens": {"cache": {"capacity": capacity, "max_ttl": "5m", "max_bytes": f"{CACHE_MAX_MIB}MiB"}},
        "issuers": [{"name": KID[a], "issuer": ISS[a], "audiences": [AUD], "algorithms": [a],
                     "keys": {"file": os.path.join(keys, f"{KID[a]}.jwks.json")},
                     "claims": {"scopes": "scope", "roles": "roles"}} for a in ISS],
        "upstream": {"identity_headers": {"x-portcullis-subject": "sub",
                                          "x-portcullis-scopes": "scope"}},
        "audit": {"enabled": audit},
        "routes": routes(),
    }
    if dry_run:
        cfg["dry_run"] = DRY_RUN
    p = os.path.join(WORK, f"{name}.portcullis.yaml")
    import yaml
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return p


def module_filter(config_path, library=None):
    """Envoy's dynamic-module HTTP filter loading module/ (or the build at `library`)
    with a Portcullis config."""
    which = {"module": {"local": {"filename": library}}} if library else {"name": MODULE}
    return {"name": "portcullis", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {**which, "do_not_close": True},
        "filter_name": "portcullis",
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": config_path}}}


def path_regex(path):
    out = re.escape(path)
    out = out.replace(r"/\*\*", "(/.*)?").replace(r"\*", "[^/]+")
    out = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", out)
    return "^" + out + "$"


def rbac_filter():
    policies = {}
    for r in routes():
        perm = {"and_rules": {"rules": [
            {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": m}}}
                                    for m in r["methods"]]}},
            {"url_path": {"path": {"safe_regex": {"regex": path_regex(r["path"])}}}}]}}
        if r.get("public"):
            principals = [{"any": True}]
        else:
            principals = []
            for rule in r["rules"]:
                conds = []
                for s in rule.get("scopes", []):
                    conds.append({"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                               "path": [{"key": "jwt_payload"}, {"key": "scope"}],
                                               "value": {"string_match": {"safe_regex": {
                                                   "regex": f"(^|.* ){re.escape(s)}( .*|$)"}}}}})
                for role in rule.get("roles", []):
                    conds.append({"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                               "path": [{"key": "jwt_payload"}, {"key": "roles"}],
                                               "value": {"list_match": {"one_of": {
                                                   "string_match": {"exact": role}}}}}})
                if not conds:  # binding-only rules: "any authenticated caller" is RBAC's closest
                    conds.append({"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                               "path": [{"key": "jwt_payload"}, {"key": "sub"}],
                                               "value": {"present_match": True}}})
                principals.append({"and_ids": {"ids": conds}})
        policies[r["id"]] = {"permissions": [perm], "principals": principals}
    return {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": policies}}}


def jwt_filter(cache_size=None):
    provider = {"issuer": ISS["RS256"], "audiences": [AUD],
                "local_jwks": {"filename": os.path.join(WORK, "keys", "rs.jwks.json")},
                "payload_in_metadata": "jwt_payload", "forward": True}
    if cache_size:
        provider["jwt_cache_config"] = {"jwt_cache_size": cache_size}
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"bench": provider},
        "rules": [{"match": {"prefix": "/healthz"}},
                  {"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}]}}


def shipped_wiring(file, cluster_name):
    """The connection manager, ext_authz filter and authorizer cluster of a shipped Envoy
    config (envoy/FILE)."""
    import yaml
    with open(os.path.join(ROOT, "envoy", file)) as f:
        doc = yaml.safe_load(f)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz = next(f for f in hcm["typed_config"]["http_filters"]
                 if f["name"] == "envoy.filters.http.ext_authz")
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == cluster_name)
    return hcm, authz, cluster


def shipped():
    """envoy/envoy.yaml: the gRPC wiring."""
    return shipped_wiring("envoy.yaml", "portcullis")


def shipped_http():
    """The ext_authz filter and authorizer cluster of envoy/envoy-http.yaml (HTTP API)."""
    _, authz, cluster = shipped_wiring("envoy-http.yaml", "portcullis_http")
    return authz, cluster


def envoy_config(name, listen, admin, filters, authz_port=None, authz_uds=None, cluster=None):
    """The shipped listener (envoy/envoy.yaml) with `filters` before the router and a
    direct_response route, so only the auth cost differs between scenarios. `cluster`: the
    authorizer cluster (default: envoy.yaml's gRPC one)."""
    hcm, _, grpc_cluster = shipped()
    cluster = cluster or grpc_cluster
    hcm = json.loads(json.dumps(hcm))
    tc = hcm["typed_config"]
    tc["http_filters"] = filters + [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    tc["route_config"] = {"name": "bench", "virtual_hosts": [{"name": "bench", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]}
    clusters = []
    if authz_port:
        c = json.loads(json.dumps(cluster))
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
            "socket_address": {"address": "127.0.0.1", "port_value": authz_port}}
        if authz_uds:
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
                "pipe": {"path": authz_uds}}
        clusters.append(c)
    doc = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
           "static_resources": {"listeners": [{"name": "ingress", "address": {"socket_address": {
               "address": "127.0.0.1", "port_value": listen}}, "filter_chains": [{"filters": [hcm]}]}],
               "clusters": clusters}}
    p = os.path.join(WORK, f"{name}.envoy.json")
    with open(p, "w") as f:
        json.dump(doc, f, indent=1)
    return p


# ---------------------------------------------------------------- processes

class Proc:
    def __init__(self, name, cmd, cpu=SUT_CPU, env=None):
        self.name = name
        logf = open(os.path.join(WORK, f"{name}.log"), "w")
        self.p = subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=subprocess.DEVNULL,
                                  stderr=logf, env={**os.environ, **(env or {})})

    @property
    def pid(self):
        return self.p.pid  # taskset execs, so this is the process itself

    def cpu_ticks(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def rss_kib(self):
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
        return out

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()


def wait_http(port, path, want, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(200).decode(errors="replace")
            s.close()
            if any(f" {w} " in data.split("\r\n")[0] + " " for w in want):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not ready")


def http_status(port, token):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ")[1])


# ---------------------------------------------------------------- load

CLK = os.sysconf("SC_CLK_TCK")


def wrk(port, tokens, secs, conns):
    lua = os.path.join(ROOT, "bench", "wrk", "tokens.lua")
    out = run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{secs}s", "-s", lua,
               f"http://127.0.0.1:{port}{PATH}", "--", tokens])
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "requests": reqs, "non2xx": int(m.group(1)) if m else 0,
            "socket_errors": errs.group(1) if errs else ""}


def measured(procs, fn):
    before = [p.cpu_ticks() for p in procs]
    r = fn()
    after = [p.cpu_ticks() for p in procs]
    n = r.get("requests") or 1
    r["cpu_us_per_req"] = {p.name: round((a - b) / CLK * 1e6 / n, 1)
                           for p, a, b in zip(procs, after, before)}
    return r


def h2load(port, data, secs, conns=4, streams=32):
    out = run(["taskset", "-c", LOAD_CPU, "h2load", "-t1", f"-c{conns}", f"-m{streams}",
               f"-D{secs}", "--warm-up-time=1", "-d", data,
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check"])
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    return {"rps": rps, "requests": int(m.group(4)), "failed": int(m.group(5))}


# ---------------------------------------------------------------- main

def median(xs):
    return round(statistics.median(xs), 3) if xs else None


DECISION_METRIC = "portcullis_decision_duration_seconds"


def decision_histogram(admin_port):
    """The authorizer's own decision-time histogram, from its /metrics: cumulative counts by
    upper bound in us (None for +Inf), and the sum in seconds. It times the decision alone,
    from the request as the authorizer read it to its decision: no hop, no queue before it,
    no encoding of the answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets, total = [], None
    for line in text.splitlines():
        m = re.match(DECISION_METRIC + r'_bucket\{le="([^"]+)"\} (\S+)$', line)
        if m:
            le = None if m.group(1) == "+Inf" else round(float(m.group(1)) * 1e6)
            buckets.append((le, int(float(m.group(2)))))
        elif line.startswith(DECISION_METRIC + "_sum "):
            total = float(line.split()[-1])
    if not buckets or total is None:
        raise RuntimeError(f"no {DECISION_METRIC} histogram on admin port {admin_port}")
    return {"buckets": buckets, "sum_s": total}


def decision_delta(before, after):
    """What the histogram gained between two reads: the decisions of one open-loop run.
    Quantiles are bucket bounds ("at most this many us"); None past the last finite bound."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after["buckets"], before["buckets"])]
    n = counts[-1][1]
    out = {"n": n, "mean_us": round((after["sum_s"] - before["sum_s"]) * 1e6 / n, 1) if n else None,
           "over_us": {str(le): n - c for le, c in counts if le is not None}}
    for q, key in ((0.5, "p50_le_us"), (0.99, "p99_le_us"), (0.999, "p999_le_us")):
        out[key] = next((le for le, c in counts if n and c >= q * n), None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10, help="closed-loop seconds per run")
    ap.add_argument("--open-secs", type=int, default=10)
    ap.add_argument("--open-rounds", type=int, help="open-loop rounds (default: --rounds)")
    ap.add_argument("--alone-secs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=10000,
                    help="distinct tokens in the '10k' and mix sets (at least 10: the mix denies every 10th)")
    ap.add_argument("--fill", type=int, default=1000000, help="distinct tokens for the RSS run")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--label", default="")
    ap.add_argument("--module-b", help="another build of module/ (a .so), run as scenario Mb "
                    "beside M: a same-run A/B of a module change (ratio M/Mb)")
    ap.add_argument("--portcullis-a", help="run scenario P (and Pd, Ph) on this portcullis binary "
                    "instead of this tree's release build (to swap an A/B's roles)")
    ap.add_argument("--module-a", help="run scenario M on this build of module/ (a .so) instead "
                    "of this tree's release build (to swap an A/B's roles)")
    ap.add_argument("--portcullis-b", help="another build of the portcullis binary, run as scenario "
                    "Pb beside P: a same-run A/B of a service change (ratio P/Pb)")
    ap.add_argument("--dry-run-b", action="store_true", help="give scenarios Pb and Mb a dry_run "
                    "candidate policy (this tree's builds unless --portcullis-b/--module-b say "
                    "otherwise): the cost of a dry run (ratios P/Pb, M/Mb)")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: closed,open,paired,alone,memory "
                    "(paired: the added p99 at 50%% measured with the load taking turns with S1; part of open)")
    ap.add_argument("--only", default="", help="comma list of scenarios to run, closed and open loop (default: all)")
    ap.add_argument("--render", help="re-summarize and print an earlier results JSON, run nothing")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            res = json.load(f)
        res["summary"] = summarize(res)
        print(render(res))
        return
    if a.tokens < 10:
        ap.error(f"--tokens {a.tokens}: at least 10 (the mix set denies every 10th token)")
    skip = set(filter(None, a.skip.split(",")))
    os.makedirs(WORK, exist_ok=True)
    sets, reqs = setup(a.tokens)
    envoy = envoy_bin()
    _, authz_filter, _ = shipped()
    http_authz_filter, http_cluster = shipped_http()
    procs = []
    try:
        # --- the systems under test, all on CPU 1, all idle except the one under load
        noop_port, p_port, p_admin, p_http = free_port(), free_port(), free_port(), free_port()
        procs.append(Proc("noop", [BENCH, "noop", "--listen", f"127.0.0.1:{noop_port}"]))
        noop_sock = os.path.join(WORK, "noop.sock")
        procs.append(Proc("noop-uds", [BENCH, "noop", "--listen", f"unix:{noop_sock}"]))
        noopx_port = free_port()
        noopx = Proc("noop-x", [BENCH, "noop", "--listen", f"127.0.0.1:{noopx_port}",
                                "--identity-headers"])
        procs.append(noopx)
        pc = Proc("portcullis", [os.path.abspath(a.portcullis_a or PORTCULLIS), "serve", "--config",
                                 portcullis_config("p", p_port, p_admin, http_port=p_http)])
        procs.append(pc)
        wait_http(p_admin, "/readyz", ["200"])
        hp = free_port()
        noop_http = Proc("noop-http", [BENCH, "noop-http", "--listen", f"127.0.0.1:{hp}"])
        procs.append(noop_http)
        legacy = {k: v for k, v in authz_filter.items()}
        legacy["typed_config"] = {k: v for k, v in authz_filter["typed_config"].items()
                                  if k != "allowed_headers"}
        m_admin = free_port()
        m_config = portcullis_config("m", free_port(), m_admin)
        # Where each authorizer's /metrics is: the open loop reads its decision-time histogram.
        admin_of = {"P": p_admin, "Ph": p_admin, "M": m_admin}
        scen = {"S1": ([], None), "S2": ([jwt_filter(), rbac_filter()], None),
                "S2c": ([jwt_filter(a.tokens), rbac_filter()], None),
                "F": ([authz_filter], noop_port), "P": ([authz_filter], p_port),
                "Pd": ([legacy], p_port), "Fu": ([authz_filter], noop_port),
                "Fx": ([authz_filter], noopx_port),
                "Fh": ([http_authz_filter], hp), "Ph": ([http_authz_filter], p_http),
                "M": ([module_filter(m_config, a.module_a and os.path.abspath(a.module_a))], None)}
        if a.module_b or a.dry_run_b:
            # Its own config copy: a module that runs the config's server binds its ports.
            mb_admin = free_port()
            mb_config = portcullis_config("mb", free_port(), mb_admin, dry_run=a.dry_run_b)
            admin_of["Mb"] = mb_admin
            scen["Mb"] = ([module_filter(mb_config, a.module_b and os.path.abspath(a.module_b))], None)
        pbc = None
        if a.portcullis_b or a.dry_run_b:
            pb_port, pb_admin = free_port(), free_port()
            pb_binary = os.path.abspath(a.portcullis_b) if a.portcullis_b else PORTCULLIS
            pbc = Proc("portcullis-b", [pb_binary, "serve", "--config",
                                        portcullis_config("pb", pb_port, pb_admin, dry_run=a.dry_run_b)])
            procs.append(pbc)
            wait_http(pb_admin, "/readyz", ["200"])
            scen["Pb"] = ([authz_filter], pb_port)
            admin_of["Pb"] = pb_admin
        envoys, ports = {}, {}
        for name, (filters, authz_port) in scen.items():
            lp, ap_ = free_port(), free_port()
            cfg = envoy_config(name, lp, ap_, filters, authz_port,
                               noop_sock if name == "Fu" else None,
                               http_cluster if name in ("Fh", "Ph") else None)
            envoys[name] = Proc(f"envoy-{name}", [envoy, "-c", cfg, "--concurrency", "1",
                                                  "--log-level", "warn", "--base-id", str(lp)],
                                env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": REL})
            procs.append(envoys[name])
            ports[name] = lp
        for name, lp in ports.items():
            wait_http(lp, "/healthz", ["200", "401", "403"])
        # Sanity: allowed and denied tokens are answered as expected everywhere.
        allow_tok = open(sets["mix"]).readline().strip()
        deny_tok = open(sets["mix"]).read().splitlines()[9]
        for name, lp in ports.items():
            got = (http_status(lp, allow_tok), http_status(lp, deny_tok))
            want = {"S1": (200, 200), "F": (200, 200), "Fu": (200, 200), "Fx": (200, 200),
                    "Fh": (200, 200)}.get(name, (200, 403))
            if got != want:
                raise RuntimeError(f"{name}: allow/deny answered {got}, expected {want}")
        authz_pid = {"F": procs[0], "Fu": procs[1], "Fx": noopx, "P": pc, "Pd": pc, "Fh": noop_http, "Ph": pc}
        if pbc:
            authz_pid["Pb"] = pbc
        results = {"meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "nproc": os.cpu_count(), "kernel": os.uname().release,
            "envoy": run([envoy, "--version"]).strip().split("version:")[-1].strip(),
            "args": vars(a), "label": a.label}, "closed": [], "open": [], "alone": [], "memory": {}}
        # How fast this machine's caches forget an idle working set, on the core under test:
        # the key to the open-loop CPU figures (README, Performance).
        results["meta"]["cache_decay"] = json.loads(
            run(["taskset", "-c", SUT_CPU, BENCH, "cache-decay"]))["cache_decay"]
        log(f"cache decay on CPU {SUT_CPU}: {results['meta']['cache_decay']}")

        def closed_once(name, tset, secs):
            ps = [envoys[name]] + ([authz_pid[name]] if name in authz_pid else [])
            return measured(ps, lambda: wrk(ports[name], sets[tset], secs, a.conns))

        if a.only:
            wanted = set(a.only.split(","))
            scen = {k: v for k, v in scen.items() if k in wanted}
        if "closed" not in skip:
            log("warm-up")
            for name in scen:
                for t in SETS:
                    closed_once(name, t, 1)
            for rnd in range(a.rounds):
                order = [(n, t) for n in scen for t in SETS]
                random.shuffle(order)
                for name, t in order:
                    r = closed_once(name, t, a.secs)
                    r.update(round=rnd, scenario=name, tokens=t)
                    log(f"closed r{rnd} {name:4} {t:4} {r['rps']:>10.0f} rps  cpu/req {r['cpu_us_per_req']}")
                    results["closed"].append(r)

        s2max = median([r["rps"] for r in results["closed"] if r["scenario"] == "S2" and r["tokens"] == "10k"])
        if "open" not in skip and s2max:
            for rnd in range(a.open_rounds or a.rounds):
                order = [(n, f) for n in OPEN_SCENARIOS + AB_SCENARIOS if n in scen
                         for f in (0.25, 0.5, 0.75)]
                random.shuffle(order)
                for name, frac in order:
                    ps = [envoys[name]] + ([authz_pid[name]] if name in authz_pid else [])
                    hist = decision_histogram(admin_of[name]) if name in admin_of else None
                    before = [p.cpu_ticks() for p in ps]
                    out = run(["taskset", "-c", LOAD_CPU, BENCH, "open-loop", "--addr",
                               f"127.0.0.1:{ports[name]}", "--path", PATH, "--tokens", sets["10k"],
                               "--rate", str(s2max * frac), "--duration", str(a.open_secs)])
                    after = [p.cpu_ticks() for p in ps]
                    r = json.loads(out)
                    if hist:
                        r["decision"] = decision_delta(hist, decision_histogram(admin_of[name]))
                    # CPU per request at this load, and how busy the core under test was: at
                    # partial load each process wakes per request instead of draining a batch,
                    # so this is not the closed-loop figure (see README, Performance).
                    n = max(1, r.get("ok", 0) + r.get("non2xx", 0))
                    secs = (after[0] - before[0] + sum(x - y for x, y in zip(after[1:], before[1:]))) / CLK
                    r.update(round=rnd, scenario=name, load=frac,
                             sut_cpu_us_per_req=round(secs * 1e6 / n, 1),
                             sut_busy_pct=round(100 * secs / a.open_secs, 1))
                    log(f"open r{rnd} {name:4} {frac:.2f} p50 {r['p50_us']} p99 {r['p99_us']} p99.9 {r['p999_us']} us"
                        f"  SUT CPU {r['sut_cpu_us_per_req']} us/req, core {r['sut_busy_pct']}% busy"
                        + (f"  decision {r['decision']}" if hist else ""))
                    results["open"].append(r)
                # The added p99 again, with the noise shared: the load takes turns of a second
                # between S1 and the scenario for twice the run, so the machine's stalls fall
                # on both alike instead of on whichever ran in a bad 10 s.
                if "paired" in skip or "S1" not in scen:
                    continue
                for name in [n for n in PAIRED if n in scen]:
                    pair = ["S1", name] if rnd % 2 == 0 else [name, "S1"]
                    cmd = ["taskset", "-c", LOAD_CPU, BENCH, "open-loop", "--slice", "1"]
                    for n in pair:
                        cmd += ["--addr", f"127.0.0.1:{ports[n]}"]
                    out = json.loads(run(cmd + ["--path", PATH, "--tokens", sets["10k"],
                                                "--rate", str(s2max * 0.5),
                                                "--duration", str(2 * a.open_secs)]))
                    by = dict(zip(pair, out["targets"]))
                    r = {"round": rnd, "scenario": name, "load": 0.5, "slice": 1, "first": pair[0],
                         "s1": by["S1"], "x": by[name]}
                    log(f"paired r{rnd} {name:4} 0.50 p99 {by[name]['p99_us']} us, S1 {by['S1']['p99_us']} us: "
                        f"added {by[name]['p99_us'] - by['S1']['p99_us']} us")
                    results.setdefault("paired", []).append(r)

        if "alone" not in skip:
            # Portcullis alone: a second instance without a token cache for the miss path.
            mp, ma = free_port(), free_port()
            miss = Proc("portcullis-nocache", [PORTCULLIS, "serve", "--config",
                                               portcullis_config("miss", mp, ma, capacity=0)])
            procs.append(miss)
            wait_http(ma, "/readyz", ["200"])
            for alg, (tfile, data) in reqs.items():
                for port in (p_port, mp):
                    code = run([BENCH, "check", "--addr", f"127.0.0.1:{port}", "--tokens", tfile]).strip()
                    if code != "0":
                        raise RuntimeError(f"{alg}: Portcullis answered gRPC code {code}, expected allow")
            for rnd in range(a.rounds):
                order = [(alg, c) for alg in reqs for c in ("hit", "miss")]
                random.shuffle(order)
                for alg, c in order:
                    proc, port = (pc, p_port) if c == "hit" else (miss, mp)
                    r = measured([proc], lambda: h2load(port, reqs[alg][1], a.alone_secs))
                    r.update(round=rnd, alg=alg, cache=c)
                    log(f"alone r{rnd} {alg:5} {c:4} {r['rps']:>10.0f} /s  cpu/req {r['cpu_us_per_req']}")
                    results["alone"].append(r)
            miss.stop()

        if "memory" not in skip:
            fp, fa = free_port(), free_port()
            fillp = Proc("portcullis-fill", [PORTCULLIS, "serve", "--config",
                                             portcullis_config("fill", fp, fa, audit=False)])
            procs.append(fillp)
            wait_http(fa, "/readyz", ["200"])
            idle = fillp.rss_kib()
            alg = "EdDSA"
            out = run(["taskset", "-c", LOAD_CPU, BENCH, "fill", "--addr", f"127.0.0.1:{fp}",
                       "--key", os.path.join(WORK, "keys", KEYFILE[alg]), "--alg", alg,
                       "--kid", KID[alg], "--issuer", ISS[alg], "--audience", AUD,
                       "--count", str(a.fill)])
            res = json.loads(out)
            metrics = run(["curl", "-s", f"http://127.0.0.1:{fa}/metrics"])
            cache_bytes = next((int(float(l.split()[-1])) for l in metrics.splitlines()
                                if l.startswith("portcullis_token_cache_bytes ")), None)
            cache_entries = next((int(float(l.split()[-1])) for l in metrics.splitlines()
                                  if l.startswith("portcullis_token_cache_entries ")), None)
            results["memory"] = {"tokens": a.fill, "cache_capacity": 100000,
                                 "cache_max_mib": CACHE_MAX_MIB, "cache_bytes": cache_bytes,
                                 "cache_entries": cache_entries, "idle_kib": idle,
                                 "after_kib": fillp.rss_kib(), "fill": res}
            log(f"memory after {a.fill} distinct tokens: {results['memory']}")
            fillp.stop()
    finally:
        for p in procs:
            p.stop()

    summary = summarize(results)
    results["summary"] = summary
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rdir = os.path.join(ROOT, "bench", "results")
    os.makedirs(rdir, exist_ok=True)
    base = os.path.join(rdir, f"{stamp}{'-' + a.label if a.label else ''}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    md = render(results)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"raw results: {base}.json")


def summarize(res):
    s = {"closed": {}, "ratios": {}, "open": {}, "alone": {}}
    rounds = sorted({r["round"] for r in res["closed"]})
    by = {(r["round"], r["scenario"], r["tokens"]): r for r in res["closed"]}
    for (rnd, n, t), r in by.items():
        s["closed"].setdefault(f"{n}/{t}", {"rps": [], "cpu": []})
        s["closed"][f"{n}/{t}"]["rps"].append(r["rps"])
        s["closed"][f"{n}/{t}"]["cpu"].append(r["cpu_us_per_req"])
    for k, v in s["closed"].items():
        cpu = {}
        for name in v["cpu"][0]:
            cpu[name] = median([c[name] for c in v["cpu"]])
        s["closed"][k] = {"rps": median(v["rps"]), "cpu_us_per_req": cpu,
                          "non2xx": [by[(rnd, *k.split("/"))]["non2xx"] for rnd in rounds if (rnd, *k.split("/")) in by]}
    pairs = PAIRS
    def cpu(r):
        return sum(r["cpu_us_per_req"].values())

    s["cpu_ratios"] = {}
    for t in SETS:
        for x, y in pairs:
            vals = [by[(rnd, x, t)]["rps"] / by[(rnd, y, t)]["rps"] for rnd in rounds
                    if (rnd, x, t) in by and (rnd, y, t) in by]
            if vals:
                s["ratios"][f"{x}/{y} {t}"] = median(vals)
            # The same ratio from CPU time per request (Envoy + authorizer, both on the one
            # core under test): capacity = 1 / CPU. Robust when other tenants steal the core.
            vals = [cpu(by[(rnd, y, t)]) / cpu(by[(rnd, x, t)]) for rnd in rounds
                    if (rnd, x, t) in by and (rnd, y, t) in by and cpu(by[(rnd, x, t)]) > 0]
            if vals:
                s["cpu_ratios"][f"{x}/{y} {t}"] = median(vals)
    for r in res["open"]:
        k = f"{r['scenario']}@{int(r['load'] * 100)}%"
        s["open"].setdefault(k, {"p50": [], "p99": [], "p999": [], "cpu": [], "busy": [], "rate": r["rate"]})
        for q in ("p50", "p99", "p999"):
            s["open"][k][q].append(r[f"{q}_us"])
        # Results from before these two figures were recorded have neither.
        if "sut_cpu_us_per_req" in r:
            s["open"][k]["cpu"].append(r["sut_cpu_us_per_req"])
            s["open"][k]["busy"].append(r["sut_busy_pct"])
    for k, v in s["open"].items():
        for q in ("p50", "p99", "p999", "cpu", "busy"):
            v[q] = median(v[q])
    # The decision's own time (runs recorded before it was read have none).
    decisions = {}
    for r in res["open"]:
        if r.get("decision"):
            decisions.setdefault(f"{r['scenario']}@{int(r['load'] * 100)}%", []).append(r["decision"])
    if decisions:
        s["decision"] = {}
        for k, ds in decisions.items():
            n = sum(d["n"] for d in ds)
            # A quantile past the last finite bound reads as "over" it.
            bound = lambda key: median([d[key] if d[key] is not None else float("inf") for d in ds])
            s["decision"][k] = {"n": n, "mean_us": median([d["mean_us"] for d in ds if d["mean_us"] is not None]),
                                "p50_le_us": bound("p50_le_us"), "p99_le_us": bound("p99_le_us"),
                                "p999_le_us": bound("p999_le_us"),
                                "over_250us": sum(d["over_us"].get("250", 0) for d in ds)}
    for name, key in ADDED_P99:
        added = []
        for rnd in {r["round"] for r in res["open"]}:
            p = [r for r in res["open"] if r["round"] == rnd and r["scenario"] == name and r["load"] == 0.5]
            b = [r for r in res["open"] if r["round"] == rnd and r["scenario"] == "S1" and r["load"] == 0.5]
            if p and b:
                added.append(p[0]["p99_us"] - b[0]["p99_us"])
        s[key] = median(added) if added else None
    for r in res.get("paired", []):
        v = s.setdefault("paired", {}).setdefault(r["scenario"], {"added": [], "x": [], "s1": []})
        v["added"].append(r["x"]["p99_us"] - r["s1"]["p99_us"])
        v["x"].append(r["x"]["p99_us"])
        v["s1"].append(r["s1"]["p99_us"])
    for v in s.get("paired", {}).values():
        v["per_round"] = v["added"]
        v["added"], v["x"], v["s1"] = median(v["added"]), median(v["x"]), median(v["s1"])
    for r in res["alone"]:
        k = f"{r['alg']}/{r['cache']}"
        s["alone"].setdefault(k, {"rps": [], "cpu": []})
        s["alone"][k]["rps"].append(r["rps"])
        s["alone"][k]["cpu"].append(r["cpu_us_per_req"]["portcullis" if r["cache"] == "hit" else "portcullis-nocache"])
    for k, v in s["alone"].items():
        s["alone"][k] = {"rps": median(v["rps"]), "cpu_us_per_req": median(v["cpu"])}
    return s


def render(res):
    m, s = res["meta"], res["summary"]
    # The many-token sets keep their key "10k" in the raw results; the tables name their size.
    nt = m["args"].get("tokens", 10000)
    many = f"{nt // 1000}k" if nt >= 10000 and nt % 1000 == 0 else str(nt)
    L = [f"Machine: {m['cpu']}, {m['nproc']} cores, Linux {m['kernel']}; Envoy {m['envoy']}; {m['date']}",
         f"Arguments: {json.dumps(m['args'])}", ""]
    if m.get("cache_decay"):
        gaps = [p["gap_us"] for p in m["cache_decay"][0]["points"]]
        L += ["### Cache decay on the core under test: ns per random read of a working set left "
              "untouched for a gap (bench cache-decay)", "",
              "| working set | " + " | ".join(f"{g} us" for g in gaps) + " |",
              "|---|" + "---:|" * len(gaps)]
        for ws in m["cache_decay"]:
            base = ws["points"][0]["ns_per_read"]
            L.append(f"| {ws['kib']} KiB | " + " | ".join(
                f"{p['ns_per_read']} ({p['ns_per_read'] / base:.1f}x)" for p in ws["points"]) + " |")
        L.append("")
    L += ["### Closed loop (wrk, 1 thread, %d connections): requests/s, median of rounds" % m["args"]["conns"], "",
          f"| scenario | 1 token | {many} tokens | {many}, 10% denied | Envoy CPU us/req ({many}) | authz CPU us/req ({many}) |",
          "|---|---:|---:|---:|---:|---:|"]
    for n in ("S1", "S2", "S2c", "F", "P", "Pd", "Fu", "Fx", "Fh", "Ph", "M", *AB_SCENARIOS):
        row = [s["closed"].get(f"{n}/{t}", {}).get("rps") for t in SETS]
        if not any(row):
            continue
        cpu = s["closed"].get(f"{n}/10k", {}).get("cpu_us_per_req", {})
        ecpu = next((v for k, v in cpu.items() if k.startswith("envoy")), "")
        acpu = next((v for k, v in cpu.items() if not k.startswith("envoy")), "")
        L.append(f"| {n} | " + " | ".join(f"{v:.0f}" if v else "" for v in row) + f" | {ecpu} | {acpu} |")
    L += ["", "### Ratios (computed within each round, median)", "", f"| ratio | 1 token | {many} tokens | {many}, 10% denied |", "|---|---:|---:|---:|"]
    order = ["/".join(p) for p in PAIRS]
    names = sorted({k.split(" ")[0] for k in s["ratios"]}, key=order.index)
    for n in names:
        L.append(f"| {n} | " + " | ".join(f"{s['ratios'].get(f'{n} {t}', '')}" for t in SETS) + " |")
    if s.get("cpu_ratios"):
        L += ["", "### Ratios from CPU time per request (SUT core: Envoy + authorizer; capacity = 1/CPU)", "",
              f"| ratio | 1 token | {many} tokens | {many}, 10% denied |", "|---|---:|---:|---:|"]
        for n in names:
            L.append(f"| {n} | " + " | ".join(f"{s['cpu_ratios'].get(f'{n} {t}', '')}" for t in SETS) + " |")
    if s["open"]:
        L += ["", f"### Open loop ({many} tokens), latency in us, median of rounds", "",
              "| scenario | load (of S2 max) | rate/s | p50 | p99 | p99.9 | SUT CPU us/req | SUT core busy % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k in sorted(s["open"], key=lambda k: ((OPEN_SCENARIOS + AB_SCENARIOS).index(k.split("@")[0]), k)):
            v = s["open"][k]
            n, load = k.split("@")
            L.append(f"| {n} | {load} | {v['rate']:.0f} | {v['p50']:.0f} | {v['p99']:.0f} | {v['p999']:.0f} | "
                     f"{v['cpu'] if v['cpu'] is not None else ''} | {v['busy'] if v['busy'] is not None else ''} |")
        for name, key in ADDED_P99:
            if s.get(key) is not None:
                L += ["", f"Added p99 at 50% ({name} minus S1, per round, median): {s[key]} us"]
    if s.get("paired"):
        L += ["", "### Added p99 at 50% of S2's rate, interleaved: the load takes turns of 1 s between S1 "
              "and the scenario (twice the open-loop seconds per round), so the machine's stalls fall on both", "",
              "| scenario | added p99 per round (us) | median | its p99 (median) | S1's p99 (median) |",
              "|---|---|---:|---:|---:|"]
        for n in sorted(s["paired"], key=lambda n: (OPEN_SCENARIOS + AB_SCENARIOS).index(n)):
            v = s["paired"][n]
            L.append(f"| {n} | {', '.join(str(x) for x in v['per_round'])} | {v['added']:.0f} | {v['x']:.0f} | {v['s1']:.0f} |")
    if s.get("decision"):
        def le(v):
            return "over the last bound" if v == float("inf") else f"{v:.0f}"
        L += ["", "### The decision's own time in the open loop: the authorizer's "
              f"`{DECISION_METRIC}` histogram read before and after each run (the decision "
              "itself, from the request as the authorizer read it to its decision: not the hop, "
              "the queue before it or encoding the answer). Quantiles are the histogram's bucket "
              "bounds, median of rounds", "",
              "| scenario | load (of S2 max) | decisions | mean us | p50 <= us | p99 <= us | p99.9 <= us "
              "| over 250 us | request p99 us (same runs) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in sorted(s["decision"], key=lambda k: ((OPEN_SCENARIOS + AB_SCENARIOS).index(k.split("@")[0]), k)):
            d, n, load = s["decision"][k], *k.split("@")
            L.append(f"| {n} | {load} | {d['n']} | {d['mean_us']} | {le(d['p50_le_us'])} | {le(d['p99_le_us'])} | "
                     f"{le(d['p999_le_us'])} | {d['over_250us']} | {s['open'][k]['p99']:.0f} |")
    if s["alone"]:
        L += ["", "### Portcullis alone (h2load, pre-encoded CheckRequests, 1 core)", "",
              "| algorithm | cache hit: decisions/s | CPU us | cache off (verify every time): decisions/s | CPU us |",
              "|---|---:|---:|---:|---:|"]
        for alg in ("RS256", "PS256", "ES256", "EdDSA"):
            h, mi = s["alone"].get(f"{alg}/hit", {}), s["alone"].get(f"{alg}/miss", {})
            L.append(f"| {alg} | {h.get('rps', 0):.0f} | {h.get('cpu_us_per_req')} | {mi.get('rps', 0):.0f} | {mi.get('cpu_us_per_req')} |")
    if res["memory"]:
        mm = res["memory"]
        budget = mm.get("cache_max_mib")
        L += ["", f"### Memory: RSS after {mm['tokens']} distinct EdDSA tokens (cache capacity {mm['cache_capacity']}, budget {budget} MiB)", "",
              f"idle {mm['idle_kib']['VmRSS'] / 1024:.1f} MiB; after: RSS {mm['after_kib']['VmRSS'] / 1024:.1f} MiB, peak {mm['after_kib']['VmHWM'] / 1024:.1f} MiB; "
              f"cache {mm.get('cache_entries')} entries, {(mm.get('cache_bytes') or 0) / 1048576:.1f} MiB estimated; "
              f"{mm['fill']['allowed']} of {mm['fill']['sent']} allowed in {mm['fill']['seconds']:.0f} s"]
        if budget:
            limit = 64 + budget
            peak = mm['after_kib']['VmHWM'] / 1024
            L.append(f"target RSS <= 64 MiB + budget = {limit} MiB: peak {peak:.1f} MiB ({'met' if peak <= limit else 'NOT met'})")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
