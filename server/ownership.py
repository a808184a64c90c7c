"""Who sequences each channel of a cluster: claims with epochs in a KV bucket.

A claim is the KV entry ``<channel token>`` of bucket ``fenghuo_owners``:
``{"node": index, "epoch": n}``.  A node takes a channel only by a
compare-and-set on the entry's revision (``create`` when there is none,
``update(last=revision)`` otherwise), with the epoch one above the claim it
replaces, and only when the present claim's node is dead (no heartbeat
within the lease) or is this very node from an earlier start.  Two nodes
racing for one channel: one CAS wins, the other reads the winner.

Every node watches the whole bucket, so each knows every claim without
asking (memory: one small entry per channel with messages since the bucket
began).  A claim is only a promise: the stream's expected-last-sequence
check is what makes a deposed owner's writes fail (server/jetstream.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from fenghuo.server.jetstream import OWNERS, Engine, Held, channel_of, stop_task, token

log = logging.getLogger("fenghuo.ownership")


@dataclass(frozen=True, slots=True)
class Claim:
    node: int
    epoch: int
    revision: int


def parse_claim(value: bytes | None, revision: int) -> Claim | None:
    if not value:
        return None
    body = orjson.loads(value)
    return Claim(body["node"], body["epoch"], revision)


class Ownership:
    """This node's view of every claim, and its own claims."""

    def __init__(self, engine: Engine, me: int, alive: Callable[[int], bool],
                 on_change: Callable[[str, Claim | None, Claim, bool], None]) -> None:
        self.engine = engine
        self.me = me
        self.alive = alive
        self.on_change = on_change
        self.claims: dict[str, Claim] = {}
        self.taken = 0                    # channels this node took over from a dead node
        self._kv: KeyValue | None = None
        self._watch: asyncio.Task[None] | None = None
        self._watched = Held(self._learn)

    async def start(self) -> None:
        """Watch every claim: back once the bucket's present claims are read, each
        claim (those and every later one) held until :meth:`release`."""
        self._kv = await self.engine.patiently(lambda: self.engine.js.key_value(OWNERS),
                                               f"bucket {OWNERS}")
        self._watch = await self.engine.watch(self._kv, self._watched, "fenghuo-owners")

    def release(self) -> None:
        """Learn the claims the watch has read, then each as it comes."""
        self._watched.release()

    def _learn(self, entry: KeyValue.Entry, watched: bool = True) -> None:
        """A claim read from the bucket: by the watch, or (``watched`` False) by a
        lookup of this node's (:meth:`claim`)."""
        claim = parse_claim(entry.value, entry.revision or 0)
        if claim is None:
            return
        name = channel_of(entry.key)
        old = self.claims.get(name)
        if old is not None and old.revision >= claim.revision:
            return
        self.claims[name] = claim
        self.on_change(name, old, claim, watched)

    async def stop(self) -> None:
        await stop_task(self._watch)

    def owner(self, channel: str) -> int | None:
        """The node sequencing ``channel`` if it has a live claimant, else None."""
        claim = self.claims.get(channel)
        if claim is None or (claim.node != self.me and not self.alive(claim.node)):
            return None
        return claim.node

    async def claim(self, channel: str) -> Claim:
        """The live claim of ``channel``: another live node's, or a new one of this node's."""
        assert self._kv is not None
        key = token(channel)
        if channel not in self.claims:
            # Nobody has claimed it as far as the watch knows (a new channel):
            # claim it outright, without asking first (across regions the
            # read is one more round trip before a channel's first message).
            try:
                return self._won(channel, None, 1,
                                 await self._kv.create(key, orjson.dumps({"node": self.me,
                                                                          "epoch": 1})))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass                            # claimed meanwhile: read it below
        while True:
            try:
                entry = await self._kv.get(key)
                present = parse_claim(entry.value, entry.revision or 0)
            except nats.js.errors.KeyNotFoundError:
                entry, present = None, None
            if present is not None and present.node != self.me and self.alive(present.node):
                assert entry is not None                # present came from it
                self._learn(entry, watched=False)
                return present
            epoch = 1 if present is None else present.epoch + 1
            value = orjson.dumps({"node": self.me, "epoch": epoch})
            try:
                if present is None:
                    revision = await self._kv.create(key, value)
                else:
                    revision = await self._kv.update(key, value, last=present.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue                        # another node moved first: read it
            return self._won(channel, present, epoch, revision)

    def _won(self, channel: str, present: Claim | None, epoch: int, revision: int) -> Claim:
        """This node's claim of ``channel`` (epoch ``epoch``) was taken, replacing ``present``."""
        if present is not None and present.node != self.me:
            self.taken += 1
            log.warning("took over a channel", extra={"channel": channel,
                                                      "from_node": present.node,
                                                      "epoch": epoch})
        claim = Claim(self.me, epoch, revision)
        old = self.claims.get(channel)
        if old is None or old.revision < revision:
            self.claims[channel] = claim
        return claim
