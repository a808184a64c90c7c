"""``fenghuo export``: a channel's or a user's messages as JSON lines, for compliance.

Every line but the last two is one message, in channel then seq order.
Then a summary: how many messages, each channel's first and last seq, and
the SHA-256 of all the message lines before it.  The last line signs
everything before it: HMAC-SHA256 with the current key of the relay's
export signing key file (server/keyfile.py) and that key's id.
:func:`verify` checks the signature with the same key file, then recomputes
the summary, so a reader can tell the file is complete and unaltered; a
channel whose seqs are not contiguous is reported as not complete.  The
SHA-256 alone proves nothing against whoever edits the file, since it can be
recomputed; the signature cannot be without the key.

It reads the SQLite file directly (WAL lets it run beside a live relay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sqlite3
import time
from pathlib import Path
from typing import IO, Any

import orjson

from fenghuo.core import ContentType
from fenghuo.server.frames import decode_frame_message
from fenghuo.server import keyfile
from fenghuo.server.atrest import FrameCipher, frame_of
from fenghuo.server.keyfile import KeyRing
from fenghuo.server.store import DB_FILE

_TEXT_TYPES = {ContentType.TEXT, ContentType.CARD, ContentType.EVENT}


def _user_channels(db: sqlite3.Connection, user: str) -> list[str]:
    direct = [name for (name,) in db.execute(
        "SELECT DISTINCT channel FROM messages WHERE channel LIKE 'dm:%'")
        if user in name[3:].split(":")]
    groups = [f"group:{gid}" for gid, record in db.execute("SELECT id, record FROM groups")
              if user in orjson.loads(record)["members"]]
    sent = [name for (name,) in db.execute(
        "SELECT DISTINCT channel FROM messages WHERE sender = ? AND channel LIKE 'org%'", (user,))]
    return sorted(set(direct) | set(groups) | set(sent))


def _line(frame: bytes) -> dict[str, Any]:
    m = decode_frame_message(frame)
    entry: dict[str, Any] = {"channel": m.channel, "seq": m.seq, "ts_us": m.ts_us,
                             "sender": m.sender, "content_type": m.content_type}
    if m.content_type in _TEXT_TYPES:
        entry["text"] = m.payload.decode("utf-8", "replace")
    else:
        entry["payload_b64"] = base64.b64encode(m.payload).decode()
    if m.meta:
        entry["meta_b64"] = base64.b64encode(m.meta).decode()
    if m.key:
        entry["key_b64"] = base64.b64encode(m.key).decode()
    return entry


SIGNATURE_ALG = "HMAC-SHA256"
#: the signing key file under the data dir when none is named
KEY_FILE = "export-signing.key"


def _mac(key: bytes, signed: bytes) -> str:
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def export(data_dir: str | Path, out: IO[bytes], signing_key_file: str | Path, *,
           channel: str | None = None, user: str | None = None,
           store_keys: KeyRing | None = None) -> dict[str, Any]:
    """Write the export to ``out``, signed with the current key of ``signing_key_file``
    (made if there is none); returns its summary.  ``store_keys`` open the
    messages the relay stored encrypted (``--store-key-file``)."""
    db = sqlite3.connect(f"file:{Path(data_dir) / DB_FILE}?mode=ro", uri=True)
    try:
        db.execute("SELECT 1 FROM messages LIMIT 1")     # no store: fail before making a key
        signing = keyfile.load_or_create(signing_key_file)
        cipher = FrameCipher(store_keys) if store_keys is not None else None
        # A store last opened by a relay older than encryption at rest has no key_id.
        key_id = "key_id" if any(c[1] == "key_id" for c in db.execute(
            "PRAGMA table_info(messages)")) else "NULL"
        channels = [channel] if channel else _user_channels(db, user or "")
        # ``signed`` sees every byte written: the signature covers the summary too.
        digest, signed, count, ranges = hashlib.sha256(), hmac.new(
            signing.key(signing.current), digestmod=hashlib.sha256), 0, {}
        for name in channels:
            query = f"SELECT seq, frame, {key_id} FROM messages WHERE channel = ?"
            params: tuple = (name,)
            if user and not channel and name.startswith("org"):
                query += " AND sender = ?"          # org channels: only what the user said
                params += (user,)
            seqs = []
            for seq, frame, kid in db.execute(query + " ORDER BY seq", params):
                line = orjson.dumps(_line(frame_of(cipher, name, seq, frame, kid))) + b"\n"
                digest.update(line)
                signed.update(line)
                out.write(line)
                seqs.append(seq)
                count += 1
            if seqs:
                ranges[name] = {"first": seqs[0], "last": seqs[-1], "count": len(seqs),
                                "contiguous": seqs[-1] - seqs[0] + 1 == len(seqs)}
    finally:
        db.close()
    summary = {"messages": count, "sha256": digest.hexdigest(), "channels": ranges,
               "exported_at_us": int(time.time() * 1_000_000),
               "scope": {"channel": channel} if channel else {"user": user}}
    line = orjson.dumps({"summary": summary}) + b"\n"
    signed.update(line)
    out.write(line)
    out.write(orjson.dumps({"signature": {"alg": SIGNATURE_ALG, "kid": signing.current,
                                          "mac": signed.hexdigest()}}) + b"\n")
    return summary


def verify(path: str | Path, keys: KeyRing) -> dict[str, Any]:
    """Check an export's signature with ``keys``, then its summary; returns the summary,
    raises ValueError if either fails."""
    digest, count, lines = hashlib.sha256(), 0, Path(path).read_bytes().splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError("empty export, or no summary and signature")
    *lines, signature_line = lines
    try:
        signature = orjson.loads(signature_line).get("signature")
    except (orjson.JSONDecodeError, AttributeError):
        signature = None
    if not isinstance(signature, dict) or signature.get("alg") != SIGNATURE_ALG:
        raise ValueError("the last line is not a signature: the export is unsigned or truncated")
    expected = _mac(keys.key(str(signature.get("kid"))), b"".join(lines))
    if not hmac.compare_digest(expected, str(signature.get("mac"))):
        raise ValueError("the signature does not match: the export was altered")
    *messages, last = lines
    summary = orjson.loads(last).get("summary")
    if summary is None:
        raise ValueError("the last line is not a summary: the export is truncated")
    for line in messages:
        digest.update(line)
        count += 1
    if count != summary["messages"] or digest.hexdigest() != summary["sha256"]:
        raise ValueError("the export does not match its summary")
    return summary
