#!/bin/bash
# use.sh old|accept|heap: put that build's compiled core in place, with the Python
# files that go with it (server/tokenwatch.py and server/node.py changed with the core).
case $1 in
  old|accept) rev=f599d5f ;;   # accept: the core of the first commit, whose Python is main's
  heap) rev=HEAD ;;
  *) echo "use.sh old|accept|heap" >&2; exit 2 ;;
esac
cd /work/wt/connect
cp /tmp/connect_builds/$1/_core.cpython-311-x86_64-linux-gnu.so core/_core.cpython-311-x86_64-linux-gnu.so
for f in server/tokenwatch.py server/node.py; do git show $rev:$f > $f; done
