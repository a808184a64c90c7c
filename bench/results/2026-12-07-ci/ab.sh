#!/usr/bin/env bash
# The test files this change made share a relay, before (BASE's versions) and
# after (the work tree's), alternated round by round under nice, each side one
# pytest run with --durations=0; wall and CPU (the relays' included: they are
# the run's reaped children) from /usr/bin/time.
#   bash bench/results/2026-12-07-ci/ab.sh BASE ROUNDS OUTDIR     (from the repository's root)
# BASE: a commit before the change (83d2079).  The old files are copied to
# tests/_ab_before_*.py (pytest collects test_*.py only: a plain run skips them)
# and removed at the end.
set -u
base=$1; rounds=$2; out=$3; mkdir -p "$out"
files="adversity validation messaging presence groups"
before=""; after=""
for f in $files; do
  git show "$base:tests/test_$f.py" > "tests/_ab_before_$f.py"
  before="$before tests/_ab_before_$f.py"; after="$after tests/test_$f.py"
done
for r in $(seq 1 "$rounds"); do
  for side in before after; do
    run=$before; [ "$side" = after ] && run=$after
    echo "round $r $side load-before $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/summary.txt"
    /usr/bin/time -f "wall %e s user %U s sys %S s" -o "$out/$r-$side.time" \
      nice -n 10 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=0 $run > "$out/$r-$side.txt" 2>&1
    echo "round $r $side $(cat "$out/$r-$side.time") $(tail -1 "$out/$r-$side.txt") load-after $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/summary.txt"
  done
done
for f in $files; do rm -f "tests/_ab_before_$f.py"; done
