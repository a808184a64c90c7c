#!/usr/bin/env bash
# Ten test files (245 tests), before and after, alternated round by round:
#   before: main's bench/targets.py and tests/conftest.py (polls of 0.05 s and 0.1 s) and no bytecode
#           of the project's modules (a clean clone under PYTHONDONTWRITEBYTECODE=1);
#   after:  this branch's two (polls of 0.02 s) and the bytecode
#           `make build` writes (python -m compileall).
# Run from the project folder on the branch: bash bench/results/2026-12-07-cispeed/sample_ab.sh BASE_REV
# Output: one file per run in $OUT (pytest --durations=0; count_starts.py's counts).
set -u
base=${1:-main}
here=bench/results/2026-12-07-cispeed
OUT=${OUT:-/tmp/cispeed-ab}; mkdir -p "$OUT"
FILES="tests/test_validation.py tests/test_messaging.py tests/test_api.py tests/test_resume.py
       tests/test_token_lifecycle.py tests/test_reply_order.py tests/test_groups.py tests/test_presence.py
       tests/test_lifecycle.py tests/test_supervisor.py"
for way in before after; do mkdir -p "$OUT/$way/bench" "$OUT/$way/tests"; done
git show "$base:bench/targets.py" > "$OUT/before/bench/targets.py"
git show "$base:tests/conftest.py" > "$OUT/before/tests/conftest.py"
cp bench/targets.py "$OUT/after/bench/targets.py"; cp tests/conftest.py "$OUT/after/tests/conftest.py"
clean() { find fenghuo server core bench scripts loadtest tests -name __pycache__ -type d -prune -exec rm -rf {} +; }
for round in 1 2; do
  for way in before after; do
    clean
    cp "$OUT/$way/bench/targets.py" bench/; cp "$OUT/$way/tests/conftest.py" tests/
    [ "$way" = after ] && .venv/bin/python -m compileall -q fenghuo server core bench loadtest scripts >/dev/null
    out=$OUT/$round-$way.txt
    echo "load before: $(cat /proc/loadavg)" > "$out"
    start=$(date +%s.%N)
    PYTHONPATH=$here COUNT_STARTS_FILE=$OUT/$round-$way.counts nice -n 10 .venv/bin/python -m pytest -q \
        -p no:cacheprovider -p count_starts --durations=0 $FILES >> "$out" 2>&1
    rc=$?
    end=$(date +%s.%N)
    echo "load after: $(cat /proc/loadavg)" >> "$out"
    echo "round $round $way rc=$rc wall=$(echo "$end - $start" | bc) s load $(cut -d' ' -f1-3 /proc/loadavg)" \
        | tee -a "$OUT/summary.txt"
  done
done
cp "$OUT/after/bench/targets.py" bench/; cp "$OUT/after/tests/conftest.py" tests/
clean
