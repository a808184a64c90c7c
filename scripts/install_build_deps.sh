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

# shellcheck source=apt.sh
. "$(dirname "$0")/apt.sh"
apt_install "$HEADER" "$PACKAGE"
have_header || fail "apt-get installed $PACKAGE but $HEADER is still not found"
echo "installed $PACKAGE"
