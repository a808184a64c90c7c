"""What the workers of one node say to each other over the mesh.

Every channel has one owning worker (``owner_of``): it alone gives the
channel's seqs, keeps its idempotency window and writes its messages to the
store, so a channel's order is one process's order whatever worker its
publishers are on.  A worker whose sessions need a channel it does not own
asks the owner for it once (control ``interest``, with the last seq it
holds); the owner answers with the frames after that seq and ``warm``, and
from then on sends it every message of the channel.  Both list channels
(name -> seq), up to :data:`CHANNELS_PER_RECORD` a record: asks made
together (a restarted owner asked again for all it fed) travel together.  That worker's replica
(ring and seq) serves its own subscribers and catch-up; a worker none of
whose sessions ever needed a channel receives none of its messages.

A record is one kind byte and a body:

========  ==================================================================
``M``     a sequenced MESSAGE frame, sent by the channel's owner to the
          workers that asked for the channel, with
          its seq and channel name ahead (the frame may be compressed)
``P``     a publish forwarded to the owner: connection id, request id,
          receive time, sender, channel, the PUBLISH body
``A``     the answer (ACK or ERROR) to a forwarded publish: connection id,
          frame
``F``     a frame for one connection (a reply to a forwarded request)
``U``     every frame of a user's sessions: user, frame (receipt events)
``H``     a worker's first record on each ring: index, generation
``C``     control, JSON: presence, groups, read cursors, new direct chats,
          interest and warm, forwarded requests
========  ==================================================================

Per-message records (``M``, ``P``, ``A``) have fixed binary heads, written
and read in C (core/mesh.pyx, heads in core/mesh.h): a worker applies the M
and P records it drains without a Python call, and hands the rest, and any
it cannot take in C, to :meth:`Cluster._on_record`.  Control records are
JSON, read rarely.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
from fenghuo import core

# Plain ints (compared with a record's first byte per record); defined once, in core/mesh.h.
MESSAGE, PUBLISH, ANSWER, FRAME, USER, HELLO, CONTROL = (
    int(kind) for kind in (core.MeshKind.MESSAGE, core.MeshKind.PUBLISH, core.MeshKind.ANSWER,
                           core.MeshKind.FRAME, core.MeshKind.USER, core.MeshKind.HELLO,
                           core.MeshKind.CONTROL))

_CONTROL_HEAD = bytes((CONTROL,))
_HELLO = struct.Struct("<BHI")         # kind, index, generation
_USER = struct.Struct("<BH")           # kind, len(user)

# The per-message records, one definition each (core/mesh.pyx):
# message(channel, seq, frame) -> M; read_message(M) -> ReplicaMessage;
# publish(connection, request_id, t_recv, sender, channel, body) -> P;
# read_publish(P) -> ForwardedPublish; to_connection(kind, connection, frame)
# -> A or F; read_to_connection(A or F) -> ConnectionFrame.
message = core.encode_mesh_message
read_message = core.read_mesh_message
publish = core.encode_mesh_publish
read_publish = core.read_mesh_publish
to_connection = core.encode_mesh_to_connection
read_to_connection = core.read_mesh_to_connection


def owner_of(channel: str, workers: int) -> int:
    """The worker that sequences ``channel`` (stable across restarts and processes)."""
    return zlib.crc32(channel.encode("utf-8")) % workers


def to_user(user: str, frame: bytes) -> bytes:
    name = user.encode("utf-8")
    return _USER.pack(USER, len(name)) + name + frame


def read_to_user(record: bytes) -> tuple[str, bytes]:
    n = _USER.unpack_from(record)[1]
    return record[_USER.size:_USER.size + n].decode("utf-8"), record[_USER.size + n:]


def hello(index: int, generation: int) -> bytes:
    return _HELLO.pack(HELLO, index, generation)


def read_hello(record: bytes) -> tuple[int, int]:
    return _HELLO.unpack_from(record)[1:]


# What :func:`control` raises for fields it cannot encode (nesting deeper
# than orjson's 255 levels, which its decoder, at 1024, lets through).
EncodeError = orjson.JSONEncodeError


def control(op: str, **fields: Any) -> bytes:
    return _CONTROL_HEAD + orjson.dumps({"op": op, **fields})


# Channels in one control record that lists channels (name -> seq: a node's
# ``heads``, ``interest``, ``warm``): a list of thousands stays far below
# NATS's 1 MB max_payload (a name is at most a few hundred bytes), and a
# replica asking again for 10,000 channels sends 10 records, not 10,000
# (bench/results/2026-12-07-askbatch).
CHANNELS_PER_RECORD = 1000


def channel_lists(channels: dict[str, int]) -> Iterator[dict[str, int]]:
    """``channels`` cut into the lists of successive records, in order, each of at
    most :data:`CHANNELS_PER_RECORD`; nothing for no channels."""
    names = list(channels)
    for at in range(0, len(names), CHANNELS_PER_RECORD):
        yield {name: channels[name] for name in names[at:at + CHANNELS_PER_RECORD]}


def read_control(record: bytes) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(record[1:])
    return body


def answered(what: str, rid: int) -> bool:
    """Does a request forwarded to another worker or node get an answer?  As one run
    where its connection is: every one does, with its request id, 0 included, except a
    RECEIPT with id 0 (fire-and-forget, docs/PROTOCOL.md §2.4)."""
    return rid != 0 or what != "receipt"
