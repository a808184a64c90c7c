#!/bin/bash
# Alternating callgrind counts, builds swapped in one worktree.
cd /work/wt/connect   # before.so: b967a22; after1.so: 609bd20; after2.so: a13cb10
SO=core/_core.cpython-311-x86_64-linux-gnu.so
B=${B:-before}; A=${A:-after1}
for r in $(seq 1 ${ROUNDS:-2}); do
  order="$B $A"; [ $((r % 2)) = 0 ] && order="$A $B"
  for b in $order; do
    cp /tmp/connect-exp/$b.so $SO
    echo "== r$r $b $(uptime)"
    .venv/bin/python -m bench connect-cost --connections 2000 --peers uvloop-floor ${KEEP:+--keep /tmp/connect-exp/$b-r$r.cg} 2>&1
  done
done
cp /tmp/connect-exp/${FINAL:-$A}.so $SO
echo "== end $(uptime)"
