"""What a cluster's nodes share besides messages: groups and cursors, in KV buckets
(docs/DESIGN.md, Cluster, "Where state lives").

* ``fenghuo_groups``: group id token -> the group's record (members, roles,
  when each joined, ``version``).  Written by the node sequencing the
  group's channel, by compare-and-set on the entry's revision: a change
  made from a stale record (another node changed the group meanwhile) is
  refused, never written over the other.  Watched by every node: a node
  started later, or one that was down, knows every group.
* ``fenghuo_cursors``: ``r.<channel>.<user>`` (read) and
  ``d.<channel>.<user>`` (delivered) -> seq, never moved backwards (a
  compare-and-set that finds a higher seq keeps it).  Watched by every node,
  so unread counts and "x of N read" are the same on any node.
* ``fenghuo_clicks``: ``<channel>.<seq>.<link>.<user>`` -> ts_us of the
  user's first click on that link of that message (the earliest stays).
  Watched by every node, so a message's clicks are the same on any node,
  including one started after them.
* ``fenghuo_devices``: ``<user>.<device>`` -> ``{channel: seq}``, a device's
  synced positions (CURSOR sync).  Read when the device says HELLO without
  positions, on whichever node it reaches: not watched.

Keys are made of :func:`~fenghuo.server.jetstream.token` s (base64url), as
channel names and user ids hold characters KV keys may not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from collections.abc import Callable
from dataclasses import dataclass

import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from fenghuo.server.clicks import Click
from fenghuo.server.jetstream import (CLICKS, CURSORS, DEVICES, GROUPS, Engine, Held, channel_of,
                                      stop_task, together, token)

log = logging.getLogger("fenghuo.cluster_state")

# Attempts of one KV write whose answer did not come (a NATS server died, a
# stream leader is being elected: a few seconds), as for a message append.
WRITE_ATTEMPTS = 4
READ, DELIVERED = "r", "d"


class Conflict(Exception):
    """A compare-and-set found a value the change was not made from."""


#: what a write does to a key's present value (None: absent): the new value,
#: None to leave it as it is, or :class:`Conflict`
Merge = Callable[[bytes | None], bytes | None]


@dataclass(frozen=True, slots=True)
class Known:
    """A key's value as this node last saw it, and the KV revision that holds it."""

    value: bytes
    revision: int


@dataclass(slots=True)
class _Write:
    merge: Merge
    done: asyncio.Future[bool]


class Bucket:
    """One KV bucket: what this node knows of its keys, and compare-and-set writes.

    Writes to one key go one at a time, the changes that arrive meanwhile
    merged into the next one (a burst of READ receipts is one write).  A
    write starts from the revision this node knows and, refused, reads the
    present value and merges again; a merge that raises :class:`Conflict`
    fails its change.
    """

    def __init__(self, engine: Engine, name: str,
                 on_change: Callable[[str, bytes, int], None] | None = None) -> None:
        self.engine, self.name = engine, name
        self.on_change = on_change           # (key, value, revision) seen by the watch
        self.known: dict[str, Known] = {}
        self._kv: KeyValue | None = None
        self._queued: dict[str, list[_Write]] = {}
        self._watch: asyncio.Task[None] | None = None
        #: what is learned (the watch's entries, records other nodes share)
        #: waits until :meth:`release`
        self._learning = Held(self._take)

    async def open(self, watch: bool) -> None:
        """Open the bucket and, if ``watch``, watch it: back once its present
        entries are read (learned at :meth:`release`)."""
        self._kv = await self.engine.patiently(lambda: self.engine.js.key_value(self.name),
                                               f"bucket {self.name}")
        if not watch:
            return
        self._watch = await self.engine.watch(self._kv, self._learn, f"fenghuo-{self.name}")

    def release(self) -> None:
        """Learn what came so far (the watch's replay, records shared meanwhile), in
        the order it came, then each as it comes."""
        self._learning.release()

    async def stop(self) -> None:
        await stop_task(self._watch)

    def _learn(self, entry: KeyValue.Entry) -> None:
        if not entry.value:
            return                           # a deletion
        self.learn(entry.key, entry.value, entry.revision or 0)

    def learn(self, key: str, value: bytes, revision: int) -> None:
        """Take ``value`` at ``revision`` for ``key`` unless a later one is known
        (before :meth:`release`, once released)."""
        self._learning(key, value, revision)

    def _take(self, key: str, value: bytes, revision: int) -> None:
        held = self.known.get(key)
        if held is not None and held.revision >= revision:
            return
        self.known[key] = Known(value, revision)
        if self.on_change is not None:
            self.on_change(key, value, revision)

    async def get(self, key: str) -> bytes | None:
        """``key``'s present value, from the stream's leader (not this node's copy)."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    def change(self, key: str, merge: Merge) -> asyncio.Future[bool]:
        """Write ``merge(present value)`` to ``key``; the future says whether it was
        written (False: a :class:`Conflict`, or the engine did not answer)."""
        done = asyncio.get_running_loop().create_future()
        queued = self._queued.get(key)
        if queued is None:
            self._queued[key] = [_Write(merge, done)]
            asyncio.get_running_loop().create_task(self._write_all(key))
        else:
            queued.append(_Write(merge, done))
        return done

    async def _write_all(self, key: str) -> None:
        while writes := self._queued.get(key):
            self._queued[key] = []
            results = await self._write(key, writes)
            for write, ok in zip(writes, results):
                if not write.done.done():
                    write.done.set_result(ok)
        self._queued.pop(key, None)

    async def _write(self, key: str, writes: list[_Write]) -> list[bool]:
        assert self._kv is not None
        for attempt in range(WRITE_ATTEMPTS):
            held = self.known.get(key)
            value = held.value if held is not None else None
            results = []
            for write in writes:
                try:
                    merged = write.merge(value)
                except Conflict:
                    results.append(False)
                    continue
                results.append(True)
                value = merged if merged is not None else value
            if value is None or (held is not None and value == held.value):
                return results               # nothing to write
            try:
                revision = await self._kv.update(key, value,
                                                 last=held.revision if held else 0)
            except nats.js.errors.KeyWrongLastSequenceError:
                await self.refresh(key)     # another node wrote it: merge again
                continue
            except Exception as exc:
                log.warning("KV write failed", extra={"bucket": self.name, "error": str(exc)})
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            held = self.known.get(key)
            if held is None or held.revision < revision:
                self.known[key] = Known(value, revision)
            return results
        return [False] * len(writes)

    async def refresh(self, key: str) -> None:
        """Learn ``key``'s present value from the stream's leader, if it is newer."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            self.known.pop(key, None)
            return
        if entry.value:
            self.learn(key, entry.value, entry.revision or 0)


def cursor_key(kind: str, channel: str, user: str) -> str:
    return f"{kind}.{token(channel)}.{token(user)}"


def device_key(user: str, device: str) -> str:
    return f"{token(user)}.{token(device)}"


def click_key(click: Click) -> str:
    return f"{token(click.channel)}.{click.seq}.{token(click.link)}.{token(click.user)}"


def _earliest(ts_us: int) -> Merge:
    """A click's time: the first one's (another node's may be earlier)."""
    def merge(present: bytes | None) -> bytes | None:
        return str(ts_us).encode() if present is None or int(present) > ts_us else None
    return merge


def _advance_to(seq: int) -> Merge:
    """A cursor moves forward only."""
    def merge(present: bytes | None) -> bytes | None:
        return str(seq).encode() if present is None or int(present) < seq else None
    return merge


def _positions(positions: dict[str, int]) -> Merge:
    """A device's synced positions: these channels' replace the ones it had."""
    def merge(present: bytes | None) -> bytes:
        held = orjson.loads(present) if present else {}
        return orjson.dumps({**held, **positions})
    return merge


def _group(record: dict[str, Any]) -> Merge:
    """A group's new record, made over the change ``record["after"]``: refused
    if the bucket holds another (a change another node made meanwhile would be
    lost, or this one was made over a change of this node's that was refused)."""
    def merge(present: bytes | None) -> bytes | None:
        held = orjson.loads(present) if present else {}
        if held.get("change") == record["change"]:
            return None                      # written already (an answer lost, retried)
        if held.get("change", "") != record["after"]:
            raise Conflict(record["id"])
        return orjson.dumps(record)
    return merge


class SharedState:
    """The three buckets, between the engine and the relay's state.

    ``on_group(record)``, ``on_cursor(kind, channel, user, seq)``: a change
    another node made (or one of this node's, seen again), applied by the
    relay.
    """

    def __init__(self, engine: Engine, on_group: Callable[[dict[str, Any]], None],
                 on_cursor: Callable[[str, str, str, int], None],
                 on_click: Callable[[Click], object]) -> None:
        self._on_group, self._on_cursor, self._on_click = on_group, on_cursor, on_click
        self.groups = Bucket(engine, GROUPS, self._group_changed)
        self.cursors = Bucket(engine, CURSORS, self._cursor_changed)
        self.devices = Bucket(engine, DEVICES)
        self.clicks = Bucket(engine, CLICKS, self._click_changed)
        self.conflicts = 0                   # group changes refused by compare-and-set

    async def open(self) -> None:
        """Read every group, cursor and click, the buckets side by side (one after
        another, each waited for its round trips: NodeCluster.join); what they
        hold is learned at :meth:`release`."""
        await together(self.groups.open(watch=True), self.cursors.open(watch=True),
                       self.devices.open(watch=False), self.clicks.open(watch=True))

    def release(self) -> None:
        """Learn every group, then every cursor (a cursor's group decides whether
        it counts), then every click; then each change as it comes."""
        self.groups.release()
        self.cursors.release()
        self.devices.release()
        self.clicks.release()

    async def stop(self) -> None:
        """Stop the buckets' watches (before the connection closes)."""
        await asyncio.gather(self.groups.stop(), self.cursors.stop(), self.clicks.stop())

    def _group_changed(self, key: str, value: bytes, revision: int) -> None:
        self._on_group({**orjson.loads(value), "revision": revision})

    def _click_changed(self, key: str, value: bytes, revision: int) -> None:
        channel, seq, link, user = key.split(".")
        self._on_click(Click(channel_of(channel), int(seq), channel_of(link), channel_of(user),
                             int(value)))

    def _cursor_changed(self, key: str, value: bytes, revision: int) -> None:
        kind, channel, user = key.split(".")
        self._on_cursor(kind, channel_of(channel), channel_of(user), int(value))

    # ------------------------------------------------------------ groups

    def learn_group(self, record: dict[str, Any]) -> None:
        """A group record another node shared after writing it (revision inside):
        kept unless this node has it, or a later one, already.  Before
        :meth:`release` (the node still starting), it waits with the watch's."""
        self.groups.learn(token(record["id"]), orjson.dumps(
            {k: v for k, v in record.items() if k != "revision"}), record["revision"])

    async def save_group(self, record: dict[str, Any]) -> int | None:
        """Write a group's record (made over the change ``after``); its revision,
        or None when another node changed the group meanwhile."""
        key = token(record["id"])
        if not await self.groups.change(key, _group(record)):
            self.conflicts += 1
            log.warning("group change refused: changed on another node meanwhile",
                        extra={"group": record["id"], "version": record["version"]})
            return None
        return self.groups.known[key].revision

    async def fetch_group(self, group_id: str) -> None:
        """Read the group from the bucket's leader and learn it if it is newer than
        what this node has (its watch may be a NATS hop behind)."""
        await self.groups.refresh(token(group_id))

    def group_record(self, group_id: str) -> dict[str, Any] | None:
        """The group's record as the bucket last held it here."""
        held = self.groups.known.get(token(group_id))
        return None if held is None else {**orjson.loads(held.value), "revision": held.revision}

    # ------------------------------------------------------------ cursors

    def save_cursor(self, kind: str, channel: str, user: str, seq: int) -> asyncio.Future[bool]:
        return self.cursors.change(cursor_key(kind, channel, user), _advance_to(seq))

    def save_device(self, user: str, device: str,
                    positions: dict[str, int]) -> asyncio.Future[bool]:
        return self.devices.change(device_key(user, device), _positions(positions))

    def save_click(self, click: Click) -> asyncio.Future[bool]:
        """A user's first click on a link of a message, for every node: the earliest stays."""
        return self.clicks.change(click_key(click), _earliest(click.ts_us))

    async def device_positions(self, user: str, device: str) -> dict[str, int]:
        """Where ``device`` of ``user`` last synced to, on any node."""
        value = await self.devices.get(device_key(user, device))
        return orjson.loads(value) if value else {}
