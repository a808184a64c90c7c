#!/usr/bin/env bash
# Install the benchmark's peer servers, nats-server and redis-server, from apt.
#
# Idempotent: when both binaries are already there (PATH, /usr/sbin or
# /usr/bin) it changes nothing and exits 0.  After a fresh install the
# packages' own system services are stopped and disabled: the benchmark
# starts its own servers on free loopback ports and never talks to them.
#
# Run: bash bench/peers/install.sh
set -euo pipefail

# Each binary is also the name of its Debian/Ubuntu package.
PEERS=(nats-server redis-server)

fail() {
  echo "bench/peers/install.sh: $*" >&2
  exit 1
}

executable() {
  [ -f "$1" ] && [ -x "$1" ]
}

# `command -v` alone is not enough: bash falls back to a match without
# execute permission when PATH holds nothing better.
have() {
  executable "$(command -v "$1" 2>/dev/null)" || executable "/usr/sbin/$1" || executable "/usr/bin/$1"
}

missing=()
for peer in "${PEERS[@]}"; do
  have "$peer" || missing+=("$peer")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "peers already installed: ${PEERS[*]}"
  exit 0
fi

# shellcheck source=../../scripts/apt.sh
. "$(dirname "$0")/../../scripts/apt.sh"
apt_install "${missing[*]}" "${missing[@]}"

stop_service() {
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now "$1" >/dev/null 2>&1 || true
  elif command -v service >/dev/null 2>&1; then
    as_root service "$1" stop >/dev/null 2>&1 || true
  fi
}

# The packages start their services (redis on 6379, nats on 4222): nothing
# here uses them, and they would take CPU and memory from the runs.
for peer in "${missing[@]}"; do
  stop_service "$peer"
done

for peer in "${missing[@]}"; do
  have "$peer" || fail "apt-get installed $peer but no $peer binary is in PATH, /usr/sbin or /usr/bin"
done
echo "installed ${missing[*]}"
