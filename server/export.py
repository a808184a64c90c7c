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

It reads the SQLite file directly (WAL lets it run beside a live relay); on
a cluster node (``--cluster``), the cluster's stream and group bucket
instead (server/cluster_export.py): a node's SQLite holds no message.

With ``--status`` each message line also carries its per-recipient status
(sent, delivered, read, escalated steps, clicked links) as of the export,
computed by server/status.py, as the API's message_status is, from the
cursors, escalations and clicks the store holds.  Positions the relay has
not yet written (its store writer batches them) are not in it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import orjson

from fenghuo.channels import parse_channel
from fenghuo.core import ChannelKind, ContentType
from fenghuo.server.clicks import Click, Clicks
from fenghuo.server.cursors import ReadCursors
from fenghuo.server.frames import decode_frame_message
from fenghuo.server import keyfile, status
from fenghuo.server.atrest import FrameCipher, frame_of
from fenghuo.server.keyfile import KeyRing
from fenghuo.server.store import DB_FILE
from fenghuo.server.timers import escalated

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


@dataclass(slots=True)
class StoredPositions:
    """One channel's read and delivery cursors and clicks as the store holds them
    (:class:`fenghuo.server.status.Positions`)."""

    reads: ReadCursors = field(default_factory=ReadCursors)
    delivered: ReadCursors = field(default_factory=ReadCursors)
    clicks: Clicks = field(default_factory=Clicks)


@dataclass(slots=True)
class ChannelStatus:
    """What ``--status`` needs of one channel to give each of its messages' status."""

    ref: status.ChannelRef
    #: user -> seq when they joined (None: an org channel)
    members: dict[str, int] | None
    at: StoredPositions
    escalations: dict[int, dict[str, tuple[int, ...]]]

    def of(self, seq: int, sender: str) -> dict[str, Any]:
        """Message ``seq``'s per-recipient status, as message_status answers it (docs/API.md)."""
        got = status.message_status(self.at, self.ref, self.members, seq, sender,
                                    escalations=self.escalations.get(seq, {}), limit=None).json()
        return {k: got[k] for k in ("recipients", "counts", "links", "users")}


def _channel_status(db: sqlite3.Connection, name: str) -> ChannelStatus:
    kind = parse_channel(name).kind
    members: dict[str, int] | None = None
    if kind == ChannelKind.DIRECT_CHAT:
        members = dict.fromkeys(parse_channel(name).participants, 0)
    elif kind == ChannelKind.GROUP_CHAT:
        row = db.execute("SELECT record FROM groups WHERE id = ?", (name.partition(":")[2],)).fetchone()
        record = orjson.loads(row[0]) if row is not None else {"members": {}}
        members = {u: record.get("joined", {}).get(u, 0) for u in record["members"]}
    at = StoredPositions()
    for cursors, table in ((at.reads, "read_cursors"), (at.delivered, "delivered_cursors")):
        for user, seq in db.execute(f"SELECT user, seq FROM {table} WHERE channel = ?", (name,)):
            cursors.advance(name, user, seq)
    for seq, link, user, ts_us in db.execute(
            "SELECT seq, link, user, ts_us FROM clicks WHERE channel = ?", (name,)):
        at.clicks.add(Click(name, seq, link, user, ts_us))
    return ChannelStatus(status.ChannelRef(name, kind), members, at, escalated(db, name))


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
           store_keys: KeyRing | None = None, with_status: bool = False,
           cluster: list[str] | None = None) -> dict[str, Any]:
    """Write the export to ``out``, signed with the current key of ``signing_key_file``
    (made if there is none); returns its summary.  ``store_keys`` open the
    messages the relay stored encrypted (``--store-key-file``).  ``with_status``:
    each message line also gives its per-recipient status at export time.
    ``cluster``: the NATS URLs of a cluster, whose stream holds the messages
    (server/cluster_export.py) rather than the SQLite file under ``data_dir``."""
    if cluster:
        if with_status:
            raise ValueError("--status is not built for --cluster: the recipients' "
                             "cursors are in the cluster's KV buckets, not read by export yet")
        import asyncio

        from fenghuo.server import cluster_export
        held = asyncio.run(cluster_export.read(cluster, channel, user))
        signing = keyfile.load_or_create(signing_key_file)
        return _write(out, signing, held, None, channel, user)
    db = sqlite3.connect(f"file:{Path(data_dir) / DB_FILE}?mode=ro", uri=True)
    try:
        db.execute("SELECT 1 FROM messages LIMIT 1")     # no store: fail before making a key
        signing = keyfile.load_or_create(signing_key_file)
        cipher = FrameCipher(store_keys) if store_keys is not None else None
        # A store last opened by a relay older than encryption at rest has no key_id.
        key_id = "key_id" if any(c[1] == "key_id" for c in db.execute(
            "PRAGMA table_info(messages)")) else "NULL"
        channels = [channel] if channel else _user_channels(db, user or "")
        return _write(out, signing, {name: _rows(db, cipher, key_id, name) for name in channels},
                      db if with_status else None, channel, user)
    finally:
        db.close()


def _rows(db: sqlite3.Connection, cipher: FrameCipher | None, key_id: str,
          name: str) -> Iterator[tuple[int, bytes]]:
    """A channel's stored (seq, frame)s in seq order, read as they are written out."""
    for seq, frame, kid in db.execute(f"SELECT seq, frame, {key_id} FROM messages "
                                      "WHERE channel = ? ORDER BY seq", (name,)):
        yield seq, frame_of(cipher, name, seq, frame, kid)


def _write(out: IO[bytes], signing: KeyRing, held: Mapping[str, Iterable[tuple[int, bytes]]],
           db: sqlite3.Connection | None, channel: str | None,
           user: str | None) -> dict[str, Any]:
    """Write the lines of ``held`` (channel -> its (seq, frame)s), the summary and the
    signature; with ``db``, each line's per-recipient status from that store."""
    # ``signed`` sees every byte written: the signature covers the summary too.
    digest, signed, count, ranges = hashlib.sha256(), hmac.new(
        signing.key(signing.current), digestmod=hashlib.sha256), 0, {}
    for name, rows in held.items():
        # Organisation channels of a user's export: only what the user said.
        only = user if user and not channel and name.startswith("org") else None
        seqs = []
        statuses = _channel_status(db, name) if db is not None else None
        for seq, frame in rows:
            entry = _line(frame)
            if only is not None and entry["sender"] != only:
                continue
            if statuses is not None:
                entry["status"] = statuses.of(seq, entry["sender"])
            line = orjson.dumps(entry) + b"\n"
            digest.update(line)
            signed.update(line)
            out.write(line)
            seqs.append(seq)
            count += 1
        if seqs:
            ranges[name] = {"first": seqs[0], "last": seqs[-1], "count": len(seqs),
                            "contiguous": seqs[-1] - seqs[0] + 1 == len(seqs)}
    summary = {"messages": count, "sha256": digest.hexdigest(), "channels": ranges,
               "exported_at_us": int(time.time() * 1_000_000),
               "scope": {"channel": channel} if channel else {"user": user},
               "recipient_status": db is not None}
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
    summary: dict[str, Any] | None = orjson.loads(last).get("summary")
    if summary is None:
        raise ValueError("the last line is not a summary: the export is truncated")
    for line in messages:
        digest.update(line)
        count += 1
    if count != summary["messages"] or digest.hexdigest() != summary["sha256"]:
        raise ValueError("the export does not match its summary")
    return summary
