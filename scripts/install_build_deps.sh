#!/usr/bin/env bash
# Install what compiling the Cython core needs beyond a C compiler: SQLite's
# headers (libsqlite3-dev; the store's writer, core/writer.pyx, calls SQLite's
# C API and links the system libsqlite3, the one Python's sqlite3 uses) and
# OpenSSL's (libssl-dev; the tokens' HMAC, core/token.pyx, calls libcrypto's
# SHA-256, the library Python's hashlib and ssl use).
#
# Idempotent: when both headers are already there it changes nothing and exits 0.
# Run by `make serve`, `make build` and `make test` before the core is compiled.
#
# Run: bash scripts/install_build_deps.sh
set -euo pipefail

# header -> the Debian package that has it
HEADERS=(sqlite3.h openssl/sha.h)
PACKAGES=(libsqlite3-dev libssl-dev)

fail() {
  echo "scripts/install_build_deps.sh: $*" >&2
  exit 1
}

# The compiler's own search path, so a header outside /usr/include counts too.
have_header() {
  echo "#include <$1>" | "${CC:-cc}" -E -x c - >/dev/null 2>&1 ||
    [ -f "/usr/include/$1" ]
}

missing=()
for i in "${!HEADERS[@]}"; do
  have_header "${HEADERS[$i]}" || missing+=("$i")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

# shellcheck source=apt.sh
. "$(dirname "$0")/apt.sh"
for i in "${missing[@]}"; do
  apt_install "${HEADERS[$i]}" "${PACKAGES[$i]}"
  have_header "${HEADERS[$i]}" || fail "apt-get installed ${PACKAGES[$i]} but ${HEADERS[$i]} is still not found"
  echo "installed ${PACKAGES[$i]}"
done
