"""The webhook outbox: events written to the store in the transaction of what they describe.

Anything in the relay that wants a backend told of something calls
``relay.emit(WebhookEvent(type, channel, data))`` (or ``store.emit``) right
after queueing the record it describes (a message, a read cursor, a timer's
state): the store's writer puts the event, one row per endpoint whose filter
accepts it, into ``webhook_outbox`` in the same transaction as the records
queued around it, and never splits an event from the record queued just
before it (server/store.py).  A message's own events (``message.created``,
and ``member.joined`` / ``member.left`` for a group's join and leave events)
are made by the writer itself from the message record, so publishing costs
the event loop nothing more.

The sender (server/webhooks.py) reads the rows back, delivers them and
records what happened through the same writer (:class:`Delivered`,
:class:`Failed`, :class:`Replay`, :class:`EndpointState`).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import orjson

from fenghuo.core import ContentType
from fenghuo.server.frames import decode_frame_message, message_json
from fenghuo.webhooks import secret_key

#: every event type the relay sends (docs/API.md, "Webhooks")
EVENT_TYPES = frozenset({
    "message.created", "message.delivered", "message.read", "message.clicked",
    "member.joined", "member.left",
    "presence.changed", "escalation", "scheduled.sent",
})

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the sender reads on from the last
    endpoint   TEXT NOT NULL,
    stream     TEXT NOT NULL,      -- delivered in order within (endpoint, stream): the channel
    event_id   TEXT NOT NULL,      -- webhook-id, the same on every attempt
    type       TEXT NOT NULL,
    payload    BLOB,               -- NULL: a message.created, made from the message when sent
    seq        INTEGER,            -- the message of a message.created (channel = stream)
    created_us INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_us    INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    dead       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS webhook_outbox_by_endpoint ON webhook_outbox (endpoint, dead, id);
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    name        TEXT PRIMARY KEY,
    disabled_us INTEGER NOT NULL,
    reason      TEXT NOT NULL
);
"""

# A group event's "event" field -> the webhook event it makes (docs/PROTOCOL.md §3.16).
_MEMBER_EVENTS = {"created": "member.joined", "join": "member.joined", "leave": "member.left"}


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """Something to tell the backends: ``data`` becomes the payload's ``data``.

    ``channel`` is what endpoint filters match by prefix and what orders
    delivery: events of one channel reach an endpoint in the order they were
    emitted (use the channel of the message the event is about; ``""`` for
    none).
    """

    type: str
    channel: str
    data: dict[str, Any]
    ts_us: int = 0      # 0: now
    #: the ordering key when it is not the channel (presence: ``user:<id>``)
    stream: str = ""

    def payload(self) -> bytes:
        ts = self.ts_us or time.time_ns() // 1000
        return orjson.dumps({"type": self.type, "timestamp": iso_time(ts), "data": self.data})


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_time(ts_us: int) -> str:
    """``2026-12-04T15:20:01.123456Z``; the second's part is formatted once per second
    (datetime formatting was a third of an event's cost on the writer thread)."""
    return f"{_iso_second(ts_us // 1_000_000)}.{ts_us % 1_000_000:06d}Z"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One receiver of webhooks and what it wants (the ``--webhooks`` file)."""

    name: str
    url: str
    secrets: tuple[str, ...]
    #: event types it receives; empty: all
    events: frozenset[str] = frozenset()
    #: channel prefixes it receives; empty: all
    channels: tuple[str, ...] = ()
    keys: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook endpoint {self.name!r}: url must be http:// or https://")
        if not self.secrets:
            raise ValueError(f"webhook endpoint {self.name!r}: at least one secret is required")
        unknown = self.events - EVENT_TYPES
        if unknown:
            raise ValueError(f"webhook endpoint {self.name!r}: unknown event types {sorted(unknown)}"
                             f" (known: {', '.join(sorted(EVENT_TYPES))})")
        try:
            object.__setattr__(self, "keys", tuple(secret_key(s) for s in self.secrets))
        except ValueError as exc:
            raise ValueError(f"webhook endpoint {self.name!r}: {exc}") from None

    def wants(self, event_type: str, channel: str) -> bool:
        return ((not self.events or event_type in self.events)
                and (not self.channels or channel.startswith(self.channels)))


def load_endpoints(path: str) -> tuple[Endpoint, ...]:
    """The endpoints of a TOML file: ``[[endpoint]]`` tables with name, url, secrets, events, channels."""
    if not Path(path).is_file():
        raise ValueError(f"--webhooks: no such file {path!r}")
    with open(path, "rb") as f:
        table = tomllib.load(f)
    unknown = set(table) - {"endpoint"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}: use [[endpoint]] tables")
    endpoints = []
    for n, entry in enumerate(table.get("endpoint", []), 1):
        extra = set(entry) - {"name", "url", "secrets", "events", "channels"}
        if extra or "name" not in entry or "url" not in entry:
            raise ValueError(f"{path}: endpoint {n} needs name, url and secrets; unknown: {sorted(extra)}")
        endpoints.append(Endpoint(str(entry["name"]), str(entry["url"]),
                                  tuple(entry.get("secrets", ())), frozenset(entry.get("events", ())),
                                  tuple(entry.get("channels", ()))))
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: endpoint names must be unique")
    return tuple(endpoints)


def reload_endpoints(path: str, current: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """The endpoints of ``path`` read again (SIGHUP): each one's url, secrets and filters
    may change, not which endpoints there are (the sender runs one loop per endpoint
    from the start, and the outbox holds their rows): ValueError then."""
    endpoints = load_endpoints(path)
    before, after = {e.name for e in current}, {e.name for e in endpoints}
    if before != after:
        raise ValueError(f"{path}: adding or removing endpoints needs a restart (added "
                         f"{sorted(after - before)}, removed {sorted(before - after)})")
    return endpoints


# ---------------------------------------------------------------- writer records
# What the sender asks the store's writer to record (typed, ordered with everything else).


@dataclass(frozen=True, slots=True)
class Delivered:
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    id: int
    attempts: int
    next_us: int
    error: str
    dead: bool


@dataclass(frozen=True, slots=True)
class Replay:
    """Dead letters back into their endpoint's queue (same webhook-id, at the end)."""
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EndpointState:
    name: str
    disabled: bool
    reason: str = ""


OutboxRecord = WebhookEvent | Delivered | Failed | Replay | EndpointState


class Outbox:
    """The store writer's side: which rows an event makes (runs on the writer thread)."""

    def __init__(self, endpoints: tuple[Endpoint, ...]) -> None:
        # Event ids: random per process start, then a counter (os.urandom per event
        # cost a system call, 3.5 us, on the writer thread).
        self._id_prefix = "msg_" + os.urandom(8).hex()
        self._ids = itertools.count(1)
        self.use(endpoints)

    def use(self, endpoints: tuple[Endpoint, ...]) -> None:
        """Filter by ``endpoints`` from now on (SIGHUP).  Called on the event loop while
        the writer thread reads these: each is replaced whole, and an event filed
        meanwhile by the old filters is one the file said was wanted a moment ago."""
        wanted = [e.events or EVENT_TYPES for e in endpoints]
        self.messages_wanted = any("message.created" in w for w in wanted)
        self.members_wanted = any(w & {"member.joined", "member.left"} for w in wanted)
        self.endpoints = endpoints

    def rows(self, event: WebhookEvent) -> list[tuple[Any, ...]]:
        """``(endpoint, stream, event_id, type, payload, created_us, seq)`` per endpoint that wants it."""
        targets = [e.name for e in self.endpoints if e.wants(event.type, event.channel)]
        if not targets:
            return []
        payload, event_id = event.payload(), self._next_id()
        now = time.time_ns() // 1000
        stream = event.stream or event.channel
        return [(name, stream, event_id, event.type, payload, now, None) for name in targets]

    def message_rows(self, channel: str, seq: int, frame: bytes) -> list[tuple[Any, ...]]:
        """The rows a stored message makes: message.created, and member.* for a group's changes.

        A message.created row holds no payload, only the message's seq: the
        sender makes the payload from the stored message when it sends it
        (:func:`message_created`), so the writer does not decode and encode
        every message (that cost 27% of publish throughput, DESIGN "Webhooks").
        """
        rows = []
        if self.messages_wanted:
            targets = [e.name for e in self.endpoints if e.wants("message.created", channel)]
            if targets:
                event_id, now = self._next_id(), time.time_ns() // 1000
                rows = [(name, channel, event_id, "message.created", None, now, seq) for name in targets]
        if self.members_wanted and channel.startswith("group:"):
            m = decode_frame_message(frame)
            if m.content_type == ContentType.EVENT:
                change = orjson.loads(m.payload)
                kind = _MEMBER_EVENTS.get(change.get("event", ""))
                if kind is not None:
                    data = {"channel": channel, "group": channel.partition(":")[2], "seq": seq,
                            "users": change.get("users", []), "by": change.get("by")}
                    if kind == "member.joined":
                        # The role the users were added with; a leave has none to
                        # give (the leavers of one removal may hold different
                        # roles): member.left has no "role" (docs/API.md).
                        data["role"] = change.get("role")
                    rows += self.rows(WebhookEvent(kind, channel, data, m.ts_us))
        return rows

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"


def message_created(channel: str, seq: int, frame: bytes | None) -> bytes:
    """The payload of a message.created from its stored frame; a message that
    retention deleted before the event was sent is ``{"channel", "seq", "removed": true}``."""
    if frame is None:
        return WebhookEvent("message.created", channel,
                            {"channel": channel, "seq": seq, "removed": True}).payload()
    m = decode_frame_message(bytes(frame))
    return WebhookEvent("message.created", channel, message_json(m), m.ts_us).payload()

