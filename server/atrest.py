"""Encryption at rest: stored message frames sealed with AES-256-GCM.

With ``--store-key-file`` every message row the writer stores holds, in its
``frame`` column, ``nonce (12 bytes) || ciphertext || tag (16 bytes)`` of the
MESSAGE frame, sealed with the key file's current key, and that key's id in
its ``key_id`` column; rows with ``key_id`` NULL are plaintext (written
before encryption was turned on).  The associated data is the row's channel
and seq, so a sealed frame moved to another row does not open.  Nonces are
random: one key should seal well under 2**32 rows (rotate before; the key
file keeps old keys readable, server/keyfile.py).

The webhook outbox's payloads (which carry message text) are sealed the
same way, the key id inside the blob (``seal_blob``), bound to the row's
endpoint and event id; so are the bodies of the API's timers (a scheduled
message's text until it is sent, server/timers.py), bound to the timer's kind
(the row id, which would bind it to its row, is only known after the insert).

What stays in clear, because the store's queries need it: each row's
channel, seq, time, sender and idempotency key, and the group records and
cursors.  The frame (payload, metadata, all of it) is sealed.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from typing import Any
from collections.abc import Iterable

from fenghuo.server.keyfile import KeyRing

NONCE_BYTES = 12
#: bytes a sealed frame adds to its plaintext: the nonce and GCM's tag
OVERHEAD = NONCE_BYTES + 16
# First byte of a sealed blob; a plaintext one is JSON, which never starts with it.
BLOB_MARK = 0x01
# A meta row marks a store that has held sealed rows: opening it without a key is refused.
_META = "sealed_with_key_ids"


class FrameCipher:
    """Seals frames with the current key, opens them with any key of the ring."""

    def __init__(self, keys: KeyRing) -> None:
        # Imported here: only a relay given a key file needs the package.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.current = keys.current
        self._seal = AESGCM(keys.key(keys.current)).encrypt
        self._aesgcm = {kid: AESGCM(key) for kid, key in keys.keys.items()}
        self.keys = keys

    @staticmethod
    def _aad(channel: str, seq: int) -> bytes:
        return channel.encode() + struct.pack(">Q", seq)

    def _encrypt(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._seal(nonce, data, aad)

    def _decrypt(self, key_id: str, sealed: bytes, aad: bytes) -> bytes:
        try:
            aesgcm = self._aesgcm[key_id]
        except KeyError:
            self.keys.key(key_id)            # raises: names the missing key
            raise
        return aesgcm.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)

    def seal(self, channel: str, seq: int, frame: bytes) -> bytes:
        return self._encrypt(frame, self._aad(channel, seq))

    def unseal(self, channel: str, seq: int, key_id: str, sealed: bytes) -> bytes:
        return self._decrypt(key_id, sealed, self._aad(channel, seq))

    def seal_blob(self, data: bytes, aad: bytes) -> bytes:
        """``data`` sealed with its key id inside: ``0x01, len(kid), kid, nonce, ciphertext``
        (for rows without a key_id column: the webhook outbox's payloads)."""
        kid = self.current.encode()
        return bytes((BLOB_MARK, len(kid))) + kid + self._encrypt(data, aad)

    def unseal_blob(self, blob: bytes, aad: bytes) -> bytes:
        end = 2 + blob[1]
        return self._decrypt(blob[2:end].decode(), blob[end:], aad)

    def seal_rows(self, rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``(channel, seq, ts_us, sender, dedupe, frame)`` rows as stored: frame sealed, key id added."""
        kid = self.current
        return [(c, s, t, snd, d, self.seal(c, s, f), kid) for c, s, t, snd, d, f in rows]


def blob_of(cipher: FrameCipher | None, blob: bytes, aad: bytes) -> bytes:
    """A stored blob (see ``seal_blob``), opened when it is sealed; a JSON one as it is."""
    blob = bytes(blob)
    if not blob or blob[0] != BLOB_MARK:
        return blob
    if cipher is None:
        raise ValueError("a stored webhook payload is encrypted: give --store-key-file")
    return cipher.unseal_blob(blob, aad)


def outbox_aad(endpoint: str, event_id: str) -> bytes:
    """What binds a sealed outbox payload to its row (a replayed row keeps both)."""
    return f"{endpoint}\0{event_id}".encode()


def timer_aad(kind: str) -> bytes:
    """What binds a sealed timer body to its kind of timer."""
    return f"timer\0{kind}".encode()


def frame_of(cipher: FrameCipher | None, channel: str, seq: int, frame: bytes,
             key_id: str | None) -> bytes:
    """A stored row's MESSAGE frame, opened when it is sealed."""
    if key_id is None:
        return bytes(frame)
    if cipher is None:
        raise ValueError(f"{channel} #{seq} is encrypted (key {key_id!r}): give --store-key-file")
    return cipher.unseal(channel, seq, key_id, bytes(frame))


def prepare(conn: sqlite3.Connection, cipher: FrameCipher | None) -> None:
    """Add the ``key_id`` column to a store made before it; refuse to open a store that
    holds sealed rows without a key."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    if "key_id" not in columns:
        try:
            conn.execute("ALTER TABLE messages ADD COLUMN key_id TEXT")
        except sqlite3.OperationalError as exc:   # another worker added it meanwhile
            if "duplicate column" not in str(exc):
                raise
    if cipher is not None:
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, '1')", (_META,))
    elif conn.execute("SELECT 1 FROM meta WHERE key = ?", (_META,)).fetchone():
        raise ValueError("the store holds encrypted messages: start with --store-key-file")
