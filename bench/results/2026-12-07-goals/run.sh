#!/usr/bin/env bash
# Issue 15's goals on an idle machine, after the final CI. Run from /work/main.
set -u
OUT=${OUT:-bench/results/2026-12-07-goals}
mkdir -p "$OUT"
PY=.venv/bin/python
log() { echo "== $(date -u +%H:%M:%S) $* | load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/runs.log"; }
fanout() {
  for m in 1000 100; do
    log "fan-out $m one r$1"
    $PY -m bench run fan-out --members $m --deployment one --json "$OUT/fanout-$m-one-r$1.json" >> "$OUT/runs.log" 2>&1
    log "fan-out $m default, --store memory r$1"
    $PY -m bench run fan-out --members $m --deployment default --relay "--store memory" --json "$OUT/fanout-$m-default-memory-r$1.json" >> "$OUT/runs.log" 2>&1
    log "fan-out $m default r$1"
    $PY -m bench run fan-out --members $m --deployment default --json "$OUT/fanout-$m-default-r$1.json" >> "$OUT/runs.log" 2>&1
  done
}
log "suite deployments (one/default x one-to-one/many-to-many x keyed/unkeyed)"
$PY -m bench suite --targets fenghuo --groups deployments --out "$OUT/deployments" >> "$OUT/runs.log" 2>&1
fanout 1
log "connect-cost --cpu --peers redis --connections 8000 --rounds 6"
$PY -m bench connect-cost --cpu --peers redis --connections 8000 --rounds 6 > "$OUT/connect-cost.txt" 2>&1
fanout 2
log "suite throughput fenghuo,nats,redis"
$PY -m bench suite --targets fenghuo,nats,redis --groups throughput --out "$OUT/throughput" >> "$OUT/runs.log" 2>&1
log "tail fenghuo-1,fenghuo,nats, 1 round"
$PY -m bench tail --rounds 1 --targets fenghuo-1,fenghuo,nats --json "$OUT/tail.json" >> "$OUT/runs.log" 2>&1
log done
