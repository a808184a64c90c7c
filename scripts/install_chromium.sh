#!/usr/bin/env bash
# Debian's chromium, for tests/test_demo_chromium.py. Idempotent: quick when
# it is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_chromium: need root and apt-get to install chromium; the demo test will be skipped" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
