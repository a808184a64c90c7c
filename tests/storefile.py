"""The relay's store file read straight from SQLite: what a crash left on disk.

The crash tests (test_crash, test_crash_dedupe, test_store_wal) check the
file itself, not what a restarted relay answers, so they read the
``messages`` table of ``fenghuo.db`` (server/store.py's schema) here, in one
place: a change of the file's layout is followed once.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fenghuo.core import FrameReader, decode_message


@dataclass(frozen=True)
class StoredMessage:
    """One row of the ``messages`` table, its frame decoded."""

    channel: str
    seq: int
    sender: str
    text: str
    #: the ``dedupe`` column: the sender, NUL, the idempotency key; None for a message sent without one
    dedupe: bytes | None


def stored_messages(db_path: Path) -> dict[str, list[StoredMessage]]:
    """Every channel's stored messages in seq order (a duplicated seq appears twice).

    Each frame is checked to be its row's (its channel and seq are the row's)
    and in plaintext: a frame sealed at rest (``key_id``) is not read here.
    """
    out: dict[str, list[StoredMessage]] = {}
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT channel, seq, sender, dedupe, key_id, frame FROM messages "
                          "ORDER BY channel, seq, id")
        for channel, seq, sender, dedupe, key_id, frame in rows:
            assert key_id is None, f"{channel} #{seq} is sealed with {key_id!r}"
            (f,) = FrameReader().feed(bytes(frame))
            m = decode_message(f.body)
            assert (m.channel, m.seq, m.sender) == (channel, seq, sender), (channel, seq)
            out.setdefault(channel, []).append(StoredMessage(
                channel, seq, sender, m.text, None if dedupe is None else bytes(dedupe)))
    return out
