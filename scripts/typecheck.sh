#!/usr/bin/env bash
# mypy over the installed package's names, and over bench/, loadtest/ and
# scripts/ beside it (at the lesser level pyproject.toml gives them). The
# source tree maps folders to packages (setup.py package_dir: server/ ->
# fenghuo.server, core/ -> fenghuo.core), which mypy cannot follow, so check
# a shadow tree of symlinks laid out as the installed package is, with the
# other three as the top-level packages they are when run from the root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shadow="$(mktemp -d)"
trap 'rm -rf "$shadow"' EXIT
mkdir "$shadow/fenghuo"
for f in "$root"/fenghuo/*; do ln -s "$f" "$shadow/fenghuo/"; done
ln -s "$root/server" "$shadow/fenghuo/server"
ln -s "$root/core" "$shadow/fenghuo/core"
for p in bench loadtest scripts; do ln -s "$root/$p" "$shadow/$p"; done
cd "$shadow"
"${MYPY:-$root/.venv/bin/mypy}" --config-file "$root/pyproject.toml" \
    -p fenghuo -p bench -p loadtest -p scripts "$@" \
    | sed "s#^fenghuo/server/#server/#; s#^fenghuo/core/#core/#"
