#!/bin/bash
# What bounds the durable path at 50,000 msgs/s offered under --fsync always:
# `python -m bench tail` runs the relay (--workers 1, pinned to CPU 0) and,
# in a steady window of it (6-10 s in), this samples each of the relay's
# threads' /proc schedstat (ns on a CPU, ns runnable waiting for one), the
# writer's batches from /metrics, and strace -T of the writer's fdatasyncs.
# Run from the worktree: bash bench/results/2026-12-06-store-bound/measure.sh
OUT=${OUT:-/tmp/store-bound}; mkdir -p $OUT
for r in $(seq 1 ${ROUNDS:-2}); do
  for t in fenghuo-1-durable fenghuo-1; do
    echo "== r$r $t $(uptime)"
    .venv/bin/python -m bench tail --rates 50000 --targets $t --rounds 1 --duration 14 > $OUT/tail-$r-$t.txt 2>&1 &
    BENCH=$!
    sleep 6
    P=$(ps -eo pid,args | grep -v grep | grep "$PWD/.venv/bin/python -m fenghuo serve" | awk '{print $1}' | head -1)
    M=$(ps -o args= -p $P | sed 's/.*--metrics-port \([0-9]*\).*/\1/')
    snap() { for d in /proc/$P/task/*; do echo "${d##*/} $(cat $d/schedstat)"; done; curl -s localhost:$M/metrics | grep -E "^fenghuo_store_batch(es|_records)_total"; date +%s.%N; }
    snap > $OUT/s1; sleep 4; snap > $OUT/s2
    python3 - $OUT/s1 $OUT/s2 $P <<'PY'
import sys
def read(p):
    th, m, t = {}, {}, 0.0
    for line in open(p):
        f = line.split()
        if line.startswith("fenghuo_"): m[f[0]] = float(f[1])
        elif len(f) == 1: t = float(f[0])
        else: th[f[0]] = (int(f[1]), int(f[2]))
    return th, m, t
a, b = read(sys.argv[1]), read(sys.argv[2])
wall = b[2] - a[2]
for tid in sorted(b[0], key=lambda k: -(b[0][k][0] - a[0].get(k, (0, 0))[0]))[:2]:
    run0, wait0 = a[0].get(tid, (0, 0))
    run = (b[0][tid][0] - run0) / 1e9; wait = (b[0][tid][1] - wait0) / 1e9
    print(f"thread {tid} ({'loop' if tid == sys.argv[3] else 'other: the writer, when durable'}): on a CPU {run / wall:.2f} s/s, runnable waiting {wait / wall:.2f} s/s, off CPU {1 - (run + wait) / wall:.2f} s/s")
if a[1]:
    n = b[1]["fenghuo_store_batches_total"] - a[1]["fenghuo_store_batches_total"]
    r = b[1]["fenghuo_store_batch_records_total"] - a[1]["fenghuo_store_batch_records_total"]
    print(f"batches {n / wall:.0f}/s, {r / max(n, 1):.0f} records a batch, {r / wall:,.0f} records/s")
PY
    if [ $t = fenghuo-1-durable ]; then
      W=$(ls /proc/$P/task | sed -n 3p)
      timeout 3 strace -T -p $W -e trace=fdatasync -o $OUT/strace-$r.txt 2>/dev/null
      grep fdatasync $OUT/strace-$r.txt | sed 's/.*<\(.*\)>/\1/' | sort -n | awk '{a[NR]=$1; s+=$1} END {printf "fdatasync (under strace): %d in 3 s, p50 %.2f p90 %.2f max %.2f ms, %.0f ms/s\n", NR, 1000*a[int(NR/2)], 1000*a[int(NR*0.9)], 1000*a[NR], 1000*s/3}'
    fi
    wait $BENCH
    grep -E "^round" $OUT/tail-$r-$t.txt | sed 's/, lag_count.*cpu_wait/, cpu_wait/; s/, own_count.*load/, load/'
    grep -E "^round" $OUT/tail-$r-$t.txt | grep -oE "cpu_ms_per_s=[0-9.]+, cpu_wait_ms_per_s=[0-9.]+|own_max_le_ms=[0-9]+"
  done
done
echo "== end $(uptime)"
