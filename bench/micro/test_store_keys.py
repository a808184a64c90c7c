"""Micro benchmark: the durable store's work per message, by the order of its idempotency keys.

Run: ``python -m pytest bench/micro/test_store_keys.py --benchmark-enable``
(bench/README.md "Idempotency keys").

Store schema 2 (server/store.py) indexed a keyed message by channel and key
(``messages_by_key``), so that a key a full dedupe window gave up was still
found; schema 3 has no such index (the window keeps given-up keys with
their seqs).  Where a new key lands in such an index depends on the key
alone: the reference client's keys (``fenghuo.client.new_key``: the time,
then random bits) land next to the sender's previous key, random keys
anywhere in it.  ``index`` "none" is schema 3 as it is.
Each round writes one transaction of 64 messages (a loop tick's worth of
one publisher with 64 in flight) into a store that already holds
``FILLED`` keyed messages of the channel, as the real writer thread does,
with ``fsync=off`` so that the disk's sync time does not drown the CPU's work.
"""

from __future__ import annotations

import itertools
import secrets
import sqlite3
from collections.abc import Callable, Iterator

import pytest
from fenghuo.client import new_key
from fenghuo.core import Channel, ChannelKind, Sequenced, SQLiteWriter
from fenghuo.server.store import SQLiteStore

BATCH = 64
FILLED = 200_000
CHANNEL = "dm:user-000001:user-000002"
SENDER = "user-000001"
FRAME = bytes(120)

KEYS: dict[str, Callable[[], bytes] | None] = {
    "none": None,
    "time-ordered (new_key)": new_key,
    "random": lambda: secrets.token_bytes(12).hex().encode(),
}


def _records(ch: Channel, seqs: Iterator[int], make_key: Callable[[], bytes] | None) -> list[Sequenced]:
    return [Sequenced(ch, seq, 1_700_000_000_000_000 + seq, SENDER,
                      None if make_key is None else SENDER.encode() + b"\0" + make_key(), FRAME)
            for seq in itertools.islice(seqs, BATCH)]


# The key index led by time instead, as was proposed to make a key's cost
# independent of key order: (channel, minute, key).  Measured, not adopted
# (bench/README.md "The order of keys in the store"): within a minute random
# keys still land on random pages of the index.
KEY_INDEX = """
CREATE INDEX messages_by_key ON messages (channel, dedupe) WHERE dedupe IS NOT NULL;
"""
TIME_LED_INDEX = """
CREATE INDEX messages_by_minute ON messages (channel, ts_us / 60000000, dedupe)
    WHERE dedupe IS NOT NULL;
"""


INDEXES = {"none": "", "channel, key": KEY_INDEX, "channel, minute, key": TIME_LED_INDEX}


@pytest.mark.parametrize("index", list(INDEXES))
@pytest.mark.parametrize("keys", list(KEYS))
def test_store_batch(benchmark, tmp_path, keys: str, index: str) -> None:
    benchmark.group = f"store: one transaction of 64 messages, by key order, index ({index})"
    benchmark.extra_info.update(messages=BATCH, filled=FILLED)
    store = SQLiteStore(tmp_path, fsync="off")
    if INDEXES[index]:
        conn = sqlite3.connect(store.path)
        conn.executescript(INDEXES[index])
        conn.close()
    writer = SQLiteWriter(store.path, full_sync=False)
    ch = Channel(CHANNEL, ChannelKind.DIRECT_CHAT, 16)
    seqs = itertools.count(1)
    make_key = KEYS[keys]

    def write(batch: list[Sequenced]) -> None:
        writer.write(batch, None, {}, None)
    try:
        for _ in range(FILLED // BATCH):
            write(_records(ch, seqs, make_key))
        benchmark.pedantic(write, setup=lambda: ((_records(ch, seqs, make_key),), {}),
                           rounds=2000, warmup_rounds=100)
    finally:
        writer.close()
        store.close()
