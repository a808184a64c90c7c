#!/usr/bin/env bash
# relay_start.py before and after, alternated round by round (see sample_ab.sh for the two ways).
# From the project folder on the branch: bash bench/results/2026-12-07-cispeed/start_ab.sh BASE_REV [ROUNDS]
set -u
base=${1:-main}; rounds=${2:-3}
here=bench/results/2026-12-07-cispeed
tmp=$(mktemp -d)
for way in before after; do mkdir -p "$tmp/$way/bench" "$tmp/$way/tests"; done
git show "$base:bench/targets.py" > "$tmp/before/bench/targets.py"
git show "$base:tests/conftest.py" > "$tmp/before/tests/conftest.py"
cp bench/targets.py "$tmp/after/bench/targets.py"; cp tests/conftest.py "$tmp/after/tests/conftest.py"
clean() { find fenghuo server core bench scripts loadtest tests -name __pycache__ -type d -prune -exec rm -rf {} +; }
for round in $(seq "$rounds"); do
  for way in before after; do
    clean
    cp "$tmp/$way/bench/targets.py" bench/; cp "$tmp/$way/tests/conftest.py" tests/
    [ "$way" = after ] && .venv/bin/python -m compileall -q fenghuo server core bench loadtest scripts >/dev/null
    echo "round $round $way"
    .venv/bin/python $here/relay_start.py 5
  done
done
cp "$tmp/after/bench/targets.py" bench/; cp "$tmp/after/tests/conftest.py" tests/
clean; rm -rf "$tmp"
