"""Where a py-spy profile's samples go, by part: ``python where.py PROFILE.txt``
(py-spy record -f raw: one collapsed stack and its count a line).  Each
sample counts once, for the first part of the list its stack matches."""

import re
import sys
from collections import Counter

PARTS = [  # (part, a frame the stack holds)
    ("imports: aiohttp (under nats-py's transport)", "aiohttp/__init__.py"),
    ("imports: the rest", "_find_and_load "),
    ("the start's one full collection (Collector.start)", "Collector.start "),
    ("the direct chats' list (Engine.channels)", "Engine.channels"),
    ("learning what the watches held (Held.release: claims, groups, cursors)", "Held.release "),
    ("the watch's own code per entry (_Watch)", "_Watch."),
    ("nats-py: parsing and passing on each message", "Client._read_loop "),
    ("nats-py: the subscription's task per message", "Subscription._wait_for_msgs "),
]

counts: Counter[str] = Counter()
total = 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    if not stack:
        continue
    total += int(n)
    frames = re.sub(r":\d+\)", ") ", stack)
    counts[next((part for part, frame in PARTS if frame in frames), "other")] += int(n)
for part, _ in [*PARTS, ("other", "")]:
    print(f"{counts[part]:6d} {100 * counts[part] / total:5.1f}%  {part}")
print(f"{total:6d} samples")
