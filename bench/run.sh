#!/usr/bin/env bash
# Portcullis benchmarks, side by side with Envoy's native jwt_authn + rbac and a no-op
# ext_authz floor. One command: installs the load tools, builds in release mode, runs every
# scenario (bench/harness.py documents them), and writes bench/results/<time>.{json,md}.
#
#   bench/run.sh                     # the full run: 5 rounds, 10 s per run (about 55 min)
#   bench/run.sh --rounds 1 --secs 3 --open-secs 3 --alone-secs 3 --fill 100000   # smoke
#   bench/run.sh soak --minutes 30   # the module under load, every decision waiting on
#                                    # Redis (bench/soak.py); exits 1 when a check fails
#   bench/run.sh instructions [--portcullis-b OLD]   # instructions and simulated cache misses
#                                    # per Check under callgrind (bench/instructions.py): an
#                                    # A/B that counts instead of timing, for a noisy machine
#
# Needs 2 cores: the load generators run on CPU 0, Envoy and the authorizer on CPU 1.
# Benchmarks are not tests: nothing here fails on speed. Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
if [[ "${1:-}" == instructions ]]; then
    command -v valgrind >/dev/null || need+=(valgrind)
fi
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml \
    || { apt-get install -y -qq python3-yaml >/dev/null; }
if [[ "$(nproc)" -lt 2 ]]; then
    echo "bench: needs at least 2 CPUs (load on CPU 0, system under test on CPU 1)" >&2
    exit 2
fi

cargo build --release --bin portcullis --example bench
# Scenario M: the decision inside Envoy, as a dynamic module (module/, envoy/envoy-module.yaml).
cargo build --release -p portcullis-envoy-module
if [[ "${1:-}" == soak ]]; then
    shift
    scripts/install-redis.sh >/dev/null
    exec python3 bench/soak.py "$@"
fi
if [[ "${1:-}" == instructions ]]; then
    shift
    exec python3 bench/instructions.py "$@"
fi
exec python3 bench/harness.py "$@"
