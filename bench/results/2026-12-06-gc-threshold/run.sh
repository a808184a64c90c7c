#!/bin/bash
# The young-generation threshold at 700 (CPython's, the default) and 7,000, side by side.
# Run from the checkout's root with its .venv: bash bench/results/2026-12-06-gc-threshold/run.sh
# Each command's output goes to OUT (default: this folder), `uptime` before and after it.
set -u
OUT=${OUT:-bench/results/2026-12-06-gc-threshold}
PY=${PY:-.venv/bin/python}
step() {  # name, command...
    local name=$1; shift
    { echo "\$ $*"; echo "before: $(uptime)"; } >> "$OUT/$name.txt"
    "$@" >> "$OUT/$name.txt" 2>&1
    echo "after: $(uptime)" >> "$OUT/$name.txt"
}
g() { echo "--gc-young-threshold=$1"; }
# (a) the tail: both thresholds are targets of every round, so they alternate within it.
step tail $PY -m bench tail --rates 10000,50000 --rounds 2 --json "$OUT/tail.json" \
    --targets "fenghuo-1:$(g 700),fenghuo-1:$(g 7000),fenghuo:$(g 700),fenghuo:$(g 7000),nats"
# (b) connect cost, alternating pairs (ABBA order so neither always goes first).
for t in 700 7000 7000 700 700 7000 7000 700; do
    step connect-cost $PY -m bench connect-cost --cpu --peers redis --connections 8000 --rounds 1 --relay="$(g $t)"
done
# (c) many-to-many, alternating.
for t in 700 7000 7000 700 700 7000; do
    step many-to-many $PY -m bench run many-to-many --relay="$(g $t)"
done
# (d) the collector's pauses by generation while 8,000 connections open and stay (alternating).
step young-pauses env PYTHONPATH=. $PY bench/results/2026-12-06-gc-threshold/young_pauses.py 2
# (e) instructions per connect under callgrind (load does not move them; where the passes fall does).
for t in 700 7000; do
    step callgrind $PY -m bench connect-cost --connections 2000 --peers uvloop-floor --relay="$(g $t)" \
        --keep "/tmp/gc-threshold-$t.callgrind"
done
# (f) a longer storm: 18,000 connections (under the 20,000 open files a process may have
# here), enough for middle-generation passes at 7,000 too.
step young-pauses env PYTHONPATH=. $PY bench/results/2026-12-06-gc-threshold/young_pauses.py 1 18000
