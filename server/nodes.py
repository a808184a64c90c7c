"""The nodes of a cluster: their mesh over core NATS, and who is alive.

:class:`NatsMesh` gives :class:`~fenghuo.server.cluster.Cluster` what the
shared-memory :class:`~fenghuo.server.mesh.Mesh` gives it between workers
(``send``, ``broadcast``, ``on_record(source, record)``), with nodes for
workers: a record for node ``k`` is a core NATS message on
``fh.node.<k>``, prefixed by the sender's index.  One connection sends
everything from one outbound queue, so a node's records reach each other
node in the order they were sent.  Core NATS drops what it cannot deliver
(a dead node, a reconnect); what matters is on the stream and is read back
from there (a replica's gap, a catch-up).

:class:`Liveness`: every node publishes a heartbeat on ``fh.heartbeat``
every third of ``--cluster-lease`` with its index, name, region and boot
id; a node not heard from within the lease is dead.  A node just started
counts every node as alive during its first lease, so it does not take
channels from owners it has not heard yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import nats.aio.client
import nats.aio.msg
import nats.aio.subscription
import nats.errors
import orjson

log = logging.getLogger("fenghuo.nodes")

NODE_SUBJECT = "fh.node."
HEARTBEAT = "fh.heartbeat"
_SOURCE = struct.Struct("<H")


@dataclass
class Peer:
    index: int
    name: str
    region: str
    boot: int
    seen: float          # monotonic time of its last heartbeat here


class Liveness:
    """Heartbeats out, heartbeats in: which nodes are alive."""

    def __init__(self, nc: nats.aio.client.Client, me: int, name: str, region: str, boot: int,
                 lease: float,
                 on_peer: Callable[[Peer, bool], None], on_lost: Callable[[Peer], None]) -> None:
        self.nc = nc
        self.me, self.name, self.region, self.boot = me, name, region, boot
        self.lease = lease
        self.on_peer = on_peer              # (peer, restarted): a node seen first or anew
        self.on_lost = on_lost              # a node past its lease
        self.peers: dict[int, Peer] = {}
        self.started = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: nats.aio.subscription.Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(HEARTBEAT, cb=self._on_heartbeat)
        await self.beat()
        self._tasks.append(asyncio.create_task(self._beat_forever(), name="fenghuo-heartbeat"))

    def _payload(self, leaving: bool = False) -> bytes:
        return orjson.dumps({"index": self.me, "name": self.name, "region": self.region,
                             "boot": self.boot, "leaving": leaving})

    async def beat(self) -> None:
        try:
            await self.nc.publish(HEARTBEAT, self._payload())
        except nats.errors.Error:
            pass                             # disconnected: the reconnect resends

    async def _beat_forever(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.lease / 3)
            now = time.monotonic()
            if now - last > self.lease:
                # This process was not running (stopped, swapped out): the
                # silence was ours, not theirs.  Give every peer a new lease.
                log.warning("heartbeat late: giving peers a new lease",
                            extra={"late_s": round(now - last, 3)})
                for peer in self.peers.values():
                    peer.seen = max(peer.seen, now)
            last = now
            await self.beat()
            for peer in self.dead():
                self.on_lost(peer)

    async def _on_heartbeat(self, msg: nats.aio.msg.Msg) -> None:
        body = orjson.loads(msg.data)
        index = body["index"]
        if index == self.me:
            return
        if body.get("leaving"):
            peer = self.peers.get(index)
            if peer is not None:
                peer.seen = -self.lease      # dead from now on
            return
        peer = self.peers.get(index)
        now = time.monotonic()
        if peer is None or peer.boot != body["boot"]:
            restarted = peer is not None
            peer = self.peers[index] = Peer(index, body["name"], body["region"], body["boot"], now)
            self.on_peer(peer, restarted)
            # Answer at once, so the newcomer knows this node before its lease is over.
            await self.beat()
        peer.seen = now

    def alive(self, index: int) -> bool:
        if index == self.me:
            return True
        now = time.monotonic()
        peer = self.peers.get(index)
        if peer is None:
            return now - self.started < self.lease
        return now - peer.seen < self.lease

    def live_peers(self) -> list[int]:
        return [i for i in self.peers if self.alive(i)]

    def dead(self) -> list[Peer]:
        """Peers past their lease, each reported once (they are forgotten)."""
        now = time.monotonic()
        gone = [p for p in self.peers.values() if now - p.seen >= self.lease]
        for peer in gone:
            del self.peers[peer.index]
        return gone

    async def stop(self) -> None:
        """Stop beating and hand the "leaving" heartbeat to the connection
        (``nats.errors.Error`` if it cannot take it).  Handed over is not sent:
        a flush answered after it says the server has it (NodeCluster.stop)."""
        for task in self._tasks:
            task.cancel()
        await self.nc.publish(HEARTBEAT, self._payload(leaving=True))


class NatsMesh:
    """Records between nodes over core NATS, in send order per destination."""

    def __init__(self, nc: nats.aio.client.Client, me: int, on_record: Callable[[int, bytes], None],
                 peers: Callable[[], list[int]]) -> None:
        self.nc = nc
        self.me = me
        self.on_record = on_record
        self.peers = peers
        self.received = 0
        self.sent = 0
        self.handler_errors = 0
        self._out: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pump: asyncio.Task[None] | None = None
        self._sub: nats.aio.subscription.Subscription | None = None

    async def open(self) -> None:
        self._sub = await self.nc.subscribe(NODE_SUBJECT + str(self.me), cb=self._on_msg)
        self._pump = asyncio.create_task(self._pump_forever(), name="fenghuo-nats-mesh")

    def start(self) -> None:
        """The shared-memory mesh's start; this one started in :meth:`open`."""

    async def _on_msg(self, msg: nats.aio.msg.Msg) -> None:
        data = msg.data
        (source,) = _SOURCE.unpack_from(data)
        self.received += 1
        try:
            self.on_record(source, data[_SOURCE.size:])
        except Exception:
            self.handler_errors += 1
            log.exception("node record handler failed", extra={"source": source})

    def send(self, dest: int, record: bytes) -> bool:
        self._out.append((NODE_SUBJECT + str(dest), _SOURCE.pack(self.me) + record))
        self._idle.clear()
        self._wake.set()
        return True

    def outlet(self, dest: int) -> None:
        """No compiled sender between nodes: records go through :meth:`send`."""
        return None

    def broadcast(self, record: bytes) -> bool:
        for peer in self.peers():
            self.send(peer, record)
        return True

    async def _pump_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._out:
                subject, payload = self._out[0]
                try:
                    await self.nc.publish(subject, payload)
                except nats.errors.Error as exc:
                    # Disconnected for longer than the client buffers: core
                    # NATS would drop it anyway; the stream has what matters.
                    log.warning("node record dropped", extra={"error": str(exc)})
                self._out.popleft()
                self.sent += 1
            self._idle.set()

    async def flush(self, timeout: float) -> bool:
        """Whether every record sent so far reached the server within ``timeout`` seconds."""
        async def sent() -> None:
            await self._idle.wait()
            # nats-py annotates an int; it hands the timeout to asyncio.wait_for.
            await self.nc.flush(timeout)  # type: ignore[arg-type]
        try:
            # One bound for both waits, not one each.
            await asyncio.wait_for(sent(), timeout)
        except (TimeoutError, nats.errors.Error):
            return False
        return True

    def close(self) -> int:
        left = len(self._out)
        if self._pump is not None:
            self._pump.cancel()
        return left


def boot_id() -> int:
    """A number new at every start of this process: peers tell a restart by it."""
    return int.from_bytes(os.urandom(4), "little")
