#!/bin/bash
# Alternating CPU rounds against redis-server, builds swapped in one worktree.
cd /work/wt/connect   # before.so: b967a22; after1.so: 609bd20; after2.so: a13cb10
SO=core/_core.cpython-311-x86_64-linux-gnu.so
B=${B:-before}; A=${A:-after1}
for r in $(seq 1 ${ROUNDS:-3}); do
  order="$B $A"; [ $((r % 2)) = 0 ] && order="$A $B"
  for b in $order; do
    cp /tmp/connect-exp/$b.so $SO
    echo "== r$r $b $(uptime)"
    .venv/bin/python -m bench connect-cost --cpu --peers redis --connections 8000 --rounds 1 2>&1
  done
done
cp /tmp/connect-exp/${FINAL:-$A}.so $SO
echo "== end $(uptime)"
