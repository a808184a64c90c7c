#!/bin/bash
# use.sh old|new: put that build's compiled core and its two Python files in the worktree
set -e
d=/tmp/connect/$1; w=/work/wt/connect
cp $d/_core.cpython-311-x86_64-linux-gnu.so $w/core/_core.cpython-311-x86_64-linux-gnu.so
cp $d/devices.py $w/server/devices.py; cp $d/relay.py $w/server/relay.py
