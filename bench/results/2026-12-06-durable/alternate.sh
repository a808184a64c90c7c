#!/bin/bash
# Alternating rounds, before (main at e7bd361, /tmp/durable-before) and after
# (this branch, /work/wt/durable): the writer's commits alone, many-to-many (durable and memory, default
# deployment) and the one-to-one tail at 50,000 msgs/s, `uptime` beside each.
for r in $(seq ${FROM:-1} ${ROUNDS:-3}); do
  order="/tmp/durable-before /work/wt/durable"; [ $((r % 2)) = 0 ] && order="/work/wt/durable /tmp/durable-before"
  for dir in $order; do
    cd $dir
    echo "== r$r $dir commits $(uptime)"
    .venv/bin/python -m bench commits --channels 1000 --batch 8192 --commits 24 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    echo "== r$r $dir m2m $(uptime)"
    .venv/bin/python -m bench run many-to-many --deployment default --duration 5 2>&1 | grep -E "deliveries/s" | head -3
    echo "== r$r $dir m2m memory $(uptime)"
    .venv/bin/python -m bench run many-to-many --deployment default --relay "--store memory" --duration 5 2>&1 | grep -E "deliveries/s" | head -3
    if [ -z "$NOTAIL" ]; then
    echo "== r$r $dir tail $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --pairs 1 --targets fenghuo-durable,fenghuo --rounds 1 --duration 5 2>&1 | grep -E "^round"
    fi
  done
done
echo "== end $(uptime)"
