#!/bin/bash
# Alternating old (main e0aece4) and new builds, redis-server in each round.
cd /work/wt/connect
for pair in ${PAIRS:-1 2 3 4}; do
  for b in old new; do
    /tmp/connect/use.sh $b
    echo "== $b pair $pair $(date -u +%H:%M:%S) uptime: $(uptime)"
    .venv/bin/python -m bench connect-cost --cpu --peers redis --connections 8000 --rounds 1 2>&1 | grep -v WARNING
  done
done
/tmp/connect/use.sh new
