#!/bin/bash
# Alternating rounds: main (the /work/main checkout, its HEAD logged) and this branch
# (/work/wt/fsync, its HEAD logged).  SET=instrumented ran at 5c00471 (main + the store's
# per-batch timings in /metrics, bench tail reading them); SET=slice at f597971 (+ the
# writer's short time slice under --fsync always).  Results in $SET/.
# Each side runs its own bench and relay (its own .venv, an editable install).
R=/work/wt/fsync/bench/results/2026-12-07-fsync/${SET:-slice}
for r in $(seq ${FROM:-1} ${ROUNDS:-3}); do
  order="main fsync"; [ $((r % 2)) = 0 ] && order="fsync main"
  for side in $order; do
    dir=/work/main; [ $side = fsync ] && dir=/work/wt/fsync
    cd $dir
    echo "== r$r $side $(git rev-parse --short HEAD) tail $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --targets fenghuo-1,fenghuo-1-durable,fenghuo-durable \
      --rounds 1 --duration 10 --json $R/tail-r$r-$side.json 2>&1 | grep -E "^round"
    echo "== r$r $side m2m always $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--fsync always" --duration 5 \
      --json $R/m2m-always-r$r-$side.json 2>&1 | grep -E "deliveries/s|cpu" | head -4
    echo "== r$r $side m2m memory $(uptime)"
    .venv/bin/python -m bench run many-to-many --relay "--store memory" --duration 5 \
      --json $R/m2m-memory-r$r-$side.json 2>&1 | grep -E "deliveries/s|cpu" | head -4
  done
done
echo "== end $(uptime)"
