#!/bin/bash
# CPU per connect, the old (main f599d5f) and new (BUILDS) builds alternating, redis-server in each round.
cd /work/wt/connect
for pair in ${PAIRS:-1 2 3 4 5 6 7 8}; do
  for b in ${BUILDS:-old heap}; do
    /tmp/connect_builds/use.sh $b
    echo "== $b pair $pair $(date -u +%H:%M:%S) uptime: $(uptime)"
    .venv/bin/python -m bench connect-cost --cpu --peers redis --connections 8000 --rounds 1 2>&1 | grep -v WARNING
  done
done
/tmp/connect_builds/use.sh heap
