#!/usr/bin/env bash
# Install what compiling the Cython core needs beyond a C compiler: SQLite's
# headers (libsqlite3-dev; the store's writer, core/writer.pyx, calls SQLite's
# C API and links the system libsqlite3, the one Python's sqlite3 uses).
#
# Idempotent: when sqlite3.h is already there it changes nothing and exits 0.
# Run by `make serve`, `make build` and `make test` before the core is compiled.
#
# Run: bash scripts/install_build_deps.sh
set -euo pipefail

PACKAGE=libsqlite3-dev
HEADER=sqlite3.h

fail() {
  echo "scripts/install_build_deps.sh: $*" >&2
  exit 1
}

# The compiler's own search path, so a header outside /usr/include counts too.
have_header() {
  echo "#include <$HEADER>" | "${CC:-cc}" -E -x c - >/dev/null 2>&1 ||
    [ -f "/usr/include/$HEADER" ]
}

if have_header; then
  exit 0
fi

command -v apt-get >/dev/null 2>&1 ||
  fail "$HEADER missing and this system has no apt-get: install SQLite's development headers with its package manager"

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 ||
    fail "$HEADER missing; installing $PACKAGE needs root and there is no sudo"
  as_root=(sudo)
  # Without a terminal nobody can type a password: fail instead of hanging.
  [ -t 0 ] || as_root+=(-n)
fi

apt() {
  ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -y -qq "$@" >/dev/null
}

echo "installing $PACKAGE with apt-get"
if ! apt install --no-install-recommends "$PACKAGE"; then
  # A fresh machine or container has no package lists yet.
  apt update || fail "apt-get update failed"
  apt install --no-install-recommends "$PACKAGE" || fail "apt-get install $PACKAGE failed"
fi
have_header || fail "apt-get installed $PACKAGE but $HEADER is still not found"
echo "installed $PACKAGE"
