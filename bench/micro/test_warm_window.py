"""Micro benchmark: a channel's dedupe window read from the store after a restart.

Run: ``python -m pytest bench/micro/test_warm_window.py --benchmark-enable``
(docs/DESIGN.md "Sequencing and delivery"; ``FENGHUO_WARM_KEYS`` keys, a
million by default).

The channel holds that many keyed messages, all in its dedupe span, as a busy
channel does after a crash (1,000,000 keys in the default 120 s span:
8,300 keyed publishes a second).  One round is what the relay does for it
once at start-up (``Relay.warm_windows``; before, at the channel's first touch,
with every connection of the process waiting): the span's keys read from the
store (``SQLiteStore.dedupe_keys``) and filed in a window of the default
size, the older keys given up with their seqs.
"""

from __future__ import annotations

import os
import sqlite3
import time

from fenghuo.core import DedupeWindow
from fenghuo.server.store import SQLiteStore

KEYS = int(os.environ.get("FENGHUO_WARM_KEYS", "1000000"))
CHANNEL = "org.busy"
SPAN_US = 120_000_000
WINDOW = 65536
FRAME = bytes(120)


def test_warm_window(benchmark, tmp_path) -> None:
    benchmark.group = "dedupe window: a channel's keys read from the store after a restart"
    benchmark.extra_info.update(keys=KEYS, window=WINDOW)
    SQLiteStore(tmp_path, fsync="off").close()
    now = time.time_ns() // 1000
    with sqlite3.connect(tmp_path / "fenghuo.db") as db:
        db.executemany("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       ((CHANNEL, seq, now - KEYS + seq, "alice", b"alice\0%024d" % seq, FRAME)
                        for seq in range(1, KEYS + 1)))
    db.close()
    store = SQLiteStore(tmp_path, fsync="off")

    def load() -> DedupeWindow:
        window = DedupeWindow(WINDOW, SPAN_US)
        window.keep_given_up = True
        window.load(store.dedupe_keys(CHANNEL, time.time_ns() // 1000 - SPAN_US))
        return window
    try:
        window = benchmark.pedantic(load, rounds=3, iterations=1)
        assert len(window) == min(KEYS, WINDOW)
    finally:
        store.close()
