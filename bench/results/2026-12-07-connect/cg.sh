#!/bin/bash
cd /work/wt/connect
for b in old new; do
  /tmp/connect/use.sh $b
  echo "== $b $(date -u +%H:%M:%S) uptime: $(uptime)"
  .venv/bin/python -m bench connect-cost --connections 2000 --keep /tmp/connect/$b-2.cg 2>&1 | grep -v WARNING
done
/tmp/connect/use.sh new
