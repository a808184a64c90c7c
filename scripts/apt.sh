# Sourced by the install scripts (scripts/install_build_deps.sh,
# bench/peers/install.sh): install Debian/Ubuntu packages with apt-get,
# through sudo when not root.  The caller defines fail().
#
#   apt_install WHAT PACKAGE...   (WHAT names them in messages)
#   as_root CMD...                run CMD as root (sudo when needed)

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif [ -t 0 ]; then
    sudo "$@"
  else
    # Without a terminal nobody can type a password: fail instead of hanging.
    sudo -n "$@"
  fi
}

apt_install() {
  local what=$1
  shift
  command -v apt-get >/dev/null 2>&1 ||
    fail "$what missing and this system has no apt-get: install them with its package manager"
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    fail "$what missing; installing needs root and there is no sudo"
  fi
  echo "installing $* with apt-get"
  if ! _apt install --no-install-recommends "$@"; then
    # A fresh machine or container has no package lists yet.
    _apt update || fail "apt-get update failed"
    _apt install --no-install-recommends "$@" || fail "apt-get install $* failed"
  fi
}

_apt() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -y -qq "$@" >/dev/null
}
