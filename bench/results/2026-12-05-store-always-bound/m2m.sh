#!/bin/bash
# alternating rounds: MAX_BATCH 8192 vs 32768 (durable, default deployment) and memory
cd /work/wt/durable
export FENGHUO_EXP_BATCHLOG=/tmp/durable_batchlog
for r in $(seq 1 ${ROUNDS:-3}); do
  order="8192 32768 65536"; [ $((r % 2)) = 0 ] && order="65536 32768 8192"
  for cap in $order; do
    rm -f /tmp/durable_batchlog-*
    echo "== r$r cap=$cap $(uptime)"
    FENGHUO_EXP_MAX_BATCH=$cap .venv/bin/python -m bench run many-to-many --deployment default --duration 5 2>&1 | grep -E "deliveries|relay publish" 
    tail -q -n1 /tmp/durable_batchlog-* 2>/dev/null
  done
  if [ -z "$NOMEM" ]; then
  echo "== r$r memory $(uptime)"
  .venv/bin/python -m bench run many-to-many --deployment default --relay "--store memory" --duration 5 2>&1 | grep -E "deliveries"
  fi
done
echo "== end $(uptime)"
