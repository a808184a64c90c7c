#!/bin/bash
# Alternating rounds, before (main at fd4bc5d) and after (WAL frames gathered):
# the same worktree, its compiled core swapped between the two builds.
cd /work/wt/durable
SO=core/_core.cpython-311-x86_64-linux-gnu.so
for r in $(seq ${FROM:-1} ${ROUNDS:-2}); do
  order="before after"; [ $((r % 2)) = 0 ] && order="after before"
  for b in $order; do
    cp /tmp/durable-exp/$b.so $SO
    echo "== r$r $b commits $(uptime)"
    .venv/bin/python -m bench commits --channels 1000 --batch 8192 --commits 24 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    .venv/bin/python -m bench commits --channels 100 --batch 100 --commits 1000 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    if [ -z "$NORELAY" ]; then
    echo "== r$r $b m2m always $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--fsync always" --duration 5 2>&1 | grep -E "deliveries/s|cpu" | head -4
    echo "== r$r $b m2m memory $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--store memory" --duration 5 2>&1 | grep -E "deliveries/s|cpu" | head -4
    echo "== r$r $b tail $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --targets fenghuo-1,fenghuo-1-durable --rounds 2 2>&1 | grep -E "^round"
    fi
  done
done
cp /tmp/durable-exp/after.so $SO
echo "== end $(uptime)"
