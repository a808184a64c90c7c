#!/bin/bash
# Alternating callgrind runs of the old and new builds.
cd /work/wt/connect
OUT=bench/results/2026-12-07-connect-syscalls
for pair in ${PAIRS:-1 2}; do
  for b in ${BUILDS:-old new}; do
    /tmp/connect_builds/use.sh $b
    echo "== $b pair $pair $(date -u +%H:%M:%S) uptime: $(uptime)"
    .venv/bin/python -m bench connect-cost --connections 2000 --keep /tmp/connect_builds/$b-$pair.cg 2>&1 | grep -v WARNING
    echo "   done $(date -u +%H:%M:%S) uptime: $(uptime)"
  done
done
/tmp/connect_builds/use.sh heap
