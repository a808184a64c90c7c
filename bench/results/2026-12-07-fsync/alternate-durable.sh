#!/bin/bash
# More alternating rounds of the durable targets alone (after alternate.sh's SET=slice):
# main (/work/main) and this branch (/work/wt/fsync at f597971), bench tail only.
R=/work/wt/fsync/bench/results/2026-12-07-fsync/${SET:-slice}
for r in $(seq ${FROM:-4} ${ROUNDS:-7}); do
  order="main fsync"; [ $((r % 2)) = 0 ] && order="fsync main"
  for side in $order; do
    dir=/work/main; [ $side = fsync ] && dir=/work/wt/fsync
    cd $dir
    echo "== r$r $side $(git rev-parse --short HEAD) tail $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --targets fenghuo-1-durable,fenghuo-durable \
      --rounds 1 --duration 10 --json $R/tail-r$r-$side.json 2>&1 | grep -E "^round"
  done
done
echo "== end $(uptime)"
