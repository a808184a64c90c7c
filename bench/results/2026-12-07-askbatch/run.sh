#!/usr/bin/env bash
# Before/after in one run: OLD is a worktree at main before this change (020c4fd),
# NEW this branch; each trigger run on both builds back to back.
#   OLD=/work/wt/askbatch-old NEW=/work/wt/askbatch bash run.sh
set -u
out=$(cd "$(dirname "$0")" && pwd)
for trigger in ${TRIGGERS:-heads restart}; do
  for build in old new; do
    tree=$OLD; [ $build = new ] && tree=$NEW
    log=$out/$trigger-$build.log
    { date -u; uptime; } > "$log"
    (cd "$tree" && .venv/bin/python -m bench cluster --parts asks --asks-channels ${CHANNELS:-100,1000,10000} \
       --asks-triggers "$trigger" --json "$out/$trigger-$build.json") >> "$log" 2>&1
    { date -u; uptime; } >> "$log"
  done
done
