#!/usr/bin/env bash
# Installs Debian's redis-server if it is missing (the shared-state tests run a real one on a
# loopback port). Idempotent; needs root (or passwordless sudo) for apt-get.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  command -v redis-server
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server >/dev/null
command -v redis-server
