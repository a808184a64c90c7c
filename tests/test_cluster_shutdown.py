"""A cluster node's graceful shutdown (SIGTERM) with publishes still waiting on
JetStream (PROTOCOL §3.20; DESIGN, Failure modes).  Real nats-servers, real
node processes, the Python client as a user runs it."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

import fenghuo
from fenghuo.client import FenghuoError
from fenghuo.server.frames import decode_frame_message
from fenghuo.server.jetstream import SUBJECT, Engine
from scripts.nats_cluster import NatsCluster
from clients import WindowedPublisher
from test_cluster import RETRYABLE, nodes, until  # noqa: F401  (nodes: the fixture)
from test_cluster_setup import NatsProxy


class AppendsHeld(NatsProxy):
    """A node's link to its nats-server that, once :meth:`hold` is called, keeps
    the node's appends to the stream (:attr:`appends_held` counts them) and
    passes everything else: the node is well, its appends wait for JetStream's
    answer.  When the node's connection ends, the appends kept are dropped, or,
    with ``late``, sent to the server then: they reach the stream after the
    node that made them is gone, their acks never seen by it."""

    def __init__(self, target: tuple[str, int], late: bool) -> None:
        super().__init__(target)
        self.late = late
        self.holding = False
        self.appends_held = 0

    def hold(self) -> None:
        self.holding = True

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: list[bytes] = []
        async for words, frame in self._frames(reader):
            if (self.holding and words[0] in (b"PUB", b"HPUB")
                    and words[1].startswith(SUBJECT.encode())):
                held.append(frame)
                self.appends_held += 1
            else:
                writer.write(frame)
        if self.late:
            writer.writelines(held)
            await writer.drain()
        writer.close()


class Publisher(WindowedPublisher):
    """A :class:`WindowedPublisher` whose n-th publish carries the key ``p<n>``
    (its text too), as an application keeps a key per message; a publish
    refused with "retry" (INTERNAL, REQUEST_TIMEOUT: PROTOCOL §4) is recorded
    in :attr:`refusals` and sent again under its key until acked."""

    def __init__(self, client: fenghuo.Client, channel: str, window: int) -> None:
        super().__init__(client, lambda n: (channel, f"p{n}"), window)
        self.refusals: list[tuple[str, int]] = []

    async def _one(self, channel: str, text: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                ack = await self.client.publish(channel, text, key=text)
                break
            except FenghuoError as exc:
                self.refusals.append((text, exc.code))
                if exc.code not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self.acked.setdefault(channel, []).append((ack.seq, text))

    def count(self, channel: str) -> int:
        return len(self.acked.get(channel, []))


@pytest.mark.parametrize("late", [False, True], ids=["appends-lost", "appends-stored-late"])
async def test_publishes_waiting_on_jetstream_at_sigterm_are_acked_once_on_another_node(
        nodes, nats_cluster: NatsCluster, late: bool):  # noqa: F811  (test_cluster's fixture)
    """A client keeps 8 publishes in flight on a group its node n1 sequences.
    n1's link to NATS starts holding n1's appends (so they wait for
    JetStream's answer however fast the machine is), and n1 gets SIGTERM with
    one held.  The client gets no ACK for those (PROTOCOL §3.20), GOAWAY and
    the close; it reconnects to n0 and sends again what was not acked, under
    the same keys, and n0, which sequences the group once n1 has left, acks
    each.  Held appends either never reach the stream, or reach it after n1
    has exited (``late``: stored, never acked by n1): either way every
    publish is acked exactly once, at the seq the stream holds it under, no
    message is stored twice and the seqs have no gap.  (With n1 acking before
    the stream answers, the appends lost leave acked seqs out of the stream.)"""
    first = nats_cluster.servers[0]
    proxy = AppendsHeld((first.host, first.port), late)
    try:
        (n0,) = nodes("n0")
        url = await proxy.start()
        (n1,) = await asyncio.to_thread(nodes, "n1", urls=[url],    # the loop runs the proxy
                                        flags=("--drain-timeout", "1"))
        alice = await n1.connect("alice")
        await alice.create_group("crew", ["bob"])            # n1 sequences group:crew
        group = "group:crew"
        load = Publisher(alice, group, window=8)
        running = asyncio.ensure_future(load.run())
        await until(lambda: _at_least(load, group, 20), 30)
        proxy.hold()
        await until(lambda: _held(proxy), 30)
        before = load.count(group)
        alice.port = n0.port                       # where the client reconnects
        n1.signal(signal.SIGTERM)
        assert await asyncio.to_thread(n1.proc.wait, 60) == 0
        # What n1 held was not acked by it: the acks after the SIGTERM are n0's,
        # once n1 has left (a re-send of a held append stored late: DUPLICATE).
        await until(lambda: _at_least(load, group, before + 30), 60)
        load.stop()
        sent = await asyncio.wait_for(running, 60)
        acked = load.acked[group]
        texts = [text for _, text in acked]
        assert sorted(texts) == sorted(f"p{n}" for n in range(1, sent + 1)), \
            "a publish was never acked, or acked twice"
        assert len(set(texts)) == len(texts), "a publish was acked twice"
        stored = await in_stream(nats_cluster, group)
        by_seq = dict(stored)
        wrong = {text: (seq, by_seq.get(seq)) for seq, text in acked if by_seq.get(seq) != text}
        assert not wrong, f"acked seqs that do not hold their message: {wrong}"
        assert [s for s, _ in stored] == list(range(1, len(stored) + 1)), "a gap in the seqs"
        payloads = [p for _, p in stored if p.startswith("p")]
        assert len(payloads) == len(set(payloads)), "a message was stored twice"
        # Only "retry" refusals, if any (n0 forwarding to n1 before its lease ran out).
        assert all(code in RETRYABLE for _, code in load.refusals), load.refusals
        assert proxy.appends_held > 0
    finally:
        await proxy.close()


async def _at_least(load: Publisher, channel: str, count: int) -> bool:
    return load.count(channel) >= count


async def _held(proxy: AppendsHeld) -> bool:
    return proxy.appends_held > 0


async def in_stream(nats_cluster: NatsCluster, channel: str) -> list[tuple[int, str]]:
    """``channel`` as the stream holds it: (seq, payload) of each message.  Read
    from the stream, not by HISTORY: a node's ring may serve messages it
    released that the stream never stored."""
    engine = await Engine.connect(nats_cluster.urls, "reader")
    try:
        stored = await engine.read(channel, 0, 1 << 62, 1_000_000)
    finally:
        await engine.close()
    return [(m.seq, decode_frame_message(m.frame).payload.decode()) for m in stored]
