#!/bin/bash
# Alternating rounds, before (main at fafbfe1, schema 4: /tmp/spans-before) and
# after (schema 5, commit spans: /work/wt/commit-spans): the writer's commits
# alone (many-to-many's batch; 100 messages over 100 channels; one message a
# commit), many-to-many under `always` and in memory, and the tail at 50,000
# msgs/s, `uptime` beside each.
BEFORE=${BEFORE:-/tmp/spans-before}; AFTER=${AFTER:-/work/wt/commit-spans}
for r in $(seq ${FROM:-1} ${ROUNDS:-2}); do
  order="$BEFORE $AFTER"; [ $((r % 2)) = 0 ] && order="$AFTER $BEFORE"
  for dir in $order; do
    cd $dir
    echo "== r$r $dir commits $(uptime)"
    .venv/bin/python -m bench commits --channels 1000 --batch 8192 --commits 24 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    .venv/bin/python -m bench commits --channels 100 --batch 100 --commits 1000 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    .venv/bin/python -m bench commits --channels 1 --batch 1 --commits 2000 --rounds 1 --wal-frames 65536 --checkpoint beside 2>&1 | grep -E "^round"
    if [ -z "$NORELAY" ]; then
    echo "== r$r $dir m2m always $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--fsync always" --duration 5 2>&1 | grep -E "deliveries/s" | head -3
    echo "== r$r $dir m2m memory $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--store memory" --duration 5 2>&1 | grep -E "deliveries/s" | head -3
    echo "== r$r $dir tail $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --targets fenghuo-1,fenghuo-1-durable --rounds 2 2>&1 | grep -E "^round"
    fi
  done
done
echo "== end $(uptime)"
