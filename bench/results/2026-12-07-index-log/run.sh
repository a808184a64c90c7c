#!/usr/bin/env bash
# Rerun: from a checkout with .venv built, bash bench/results/2026-12-07-index-log/run.sh
# (the three parts were started one after the other on 2026-12-06/07; each file
# starts with its command and the uptime before and ends with the uptime after)
set -u
out=$(dirname "$0")
run() {  # run FILE ARGS...: python -m bench commits ARGS, into FILE
  local f="$out/$1"; shift
  { echo "# $(date -u +%FT%TZ) uptime: $(uptime)"
    echo "# python -m bench commits $*"
    .venv/bin/python -m bench commits "$@"
    echo "# $(date -u +%FT%TZ) uptime: $(uptime)"; } > "$f" 2>&1
}
# 1. schema 5 beside the log layouts, 2 rounds alternating, at four commit sizes
common="--wal-frames 65536 --checkpoint beside --layout schema5,log,log-move --index-every 65536,262144 --rounds 2"
for size in "1 400 2624" "1000 8192 128" "500 8192 128" "100 100 2622"; do
  set -- $size
  # shellcheck disable=SC2086
  run "commits-$1x$2.txt" --channels "$1" --batch "$2" --commits "$3" $common
done
# 2. at many-to-many's commits, larger builds (2,097,152 messages: 2 builds of 1,048,576)
run commits-1000x8192-large-builds.txt --channels 1000 --batch 8192 --commits 256 --wal-frames 65536 \
  --checkpoint beside --layout schema5,log --index-every 262144,1048576 --rounds 2
# 3. the build on a thread and file of its own, not holding the writer (deferred-attached),
#    every 32 commits = 262,144 messages, beside the same build on the writer's thread (deferred)
run commits-1000x8192-attached.txt --channels 1000 --batch 8192 --commits 128 --wal-frames 65536 \
  --checkpoint beside --layout schema5,deferred,deferred-attached --file-every 32 --rounds 2
