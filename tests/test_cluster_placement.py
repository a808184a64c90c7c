"""Placing the cluster's stream and buckets (docs/DESIGN.md, "Placing the stream").

Four nats-servers on loopback tagged by region (``server_tags``); three of them
also carry the tag the nodes' ``--stream-tags`` names, and ``--stream-leader``
names one of those three.  Real nats-servers and fenghuo nodes only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from fenghuo.server.jetstream import STREAMS
from scripts.nats_cluster import NatsCluster
from rawwire import metrics
from test_cluster import messages_of, nodes, publish_surely, stored_messages  # noqa: F401  (nodes: the fixture)

REGIONS = ("east", "west", "north", "south")
TAG = "fenghuo-stream"
LEADER = "n1"                       # west's server
HOLDERS = {"n0", "n1", "n2"}        # tagged TAG: south's server n3 is not
# Seconds for the nodes to move every stream's leader to LEADER: a node looks
# every 5 s and each step-down lands on it one time in two; a busy machine.
PINNED_WITHIN = 90.0


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Four nats-servers, n<k> tagged ``region:<REGIONS[k]>``, all but south's ``TAG``
    (overrides conftest's three for this module's ``nodes``)."""
    tags = [(f"region:{r}",) + ((TAG,) if r != "south" else ()) for r in REGIONS]
    cluster = NatsCluster.start(tmp_path / "nats", size=4, tags=tags)
    yield cluster
    cluster.stop()


async def placement(url: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Each of the cluster's streams: its leader ("" during an election) and the
    servers holding it."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=3)
        out = {}
        for stream in STREAMS:
            try:
                cluster = (await js.stream_info(stream)).cluster
            except nats.errors.Error:
                out[stream] = ("", frozenset())
                continue
            assert cluster is not None
            leader = cluster.leader or ""
            out[stream] = (leader, frozenset({leader, *(r.name for r in cluster.replicas or ())}))
        return out
    finally:
        await nc.close()


async def led_from(url: str, server: str, within: float) -> dict[str, tuple[str, frozenset[str]]]:
    """The placement once every stream is led by ``server`` (fails after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        now = await placement(url)
        if all(leader == server for leader, _ in now.values()):
            return now
        assert time.monotonic() < deadline, f"not all led by {server}: {now}"
        await asyncio.sleep(0.5)


async def test_the_stream_and_buckets_sit_on_the_tagged_servers_led_from_the_named_one_through_failover(
        nodes, nats_cluster: NatsCluster):  # noqa: F811  (test_cluster's fixture)
    """--stream-tags puts the stream's and every bucket's three replicas on the
    servers carrying the tag (never south's), and --stream-leader has the nodes
    move each leader to the named server (JetStream elects any replica).  That
    server killed, JetStream elects another holder and the chat goes on at the
    next seqs; started again, the leaders come back to it, and the chat still
    has one gap-free order with every acked message at its seq."""
    servers = nats_cluster.servers
    flags = ("--stream-tags", TAG, "--stream-leader", LEADER)
    (east,) = nodes("east", flags=("--region", "east", *flags), servers=[servers[0]])
    (south,) = nodes("south", flags=("--region", "south", *flags), servers=[servers[3]])
    watcher = servers[3].url                      # south's server holds no replica: never killed
    placed = await led_from(watcher, LEADER, PINNED_WITHIN)
    assert {held for _, held in placed.values()} == {frozenset(HOLDERS)}

    alice = await east.connect("alice")
    bob = await south.connect("bob")
    chat = "dm:alice:bob"
    acked: dict[str, int] = {}

    async def send(first: int, count: int) -> None:
        for i in range(first, first + count):
            key = f"m{i}"
            acked[key] = (await publish_surely(alice, chat, key, key, time.monotonic() + 40)).seq

    await send(0, 3)
    assert sorted(acked.values()) == [1, 2, 3]

    servers[1].kill()                             # the leader of every stream
    await send(3, 3)                              # through the election (4-9 s in 2.9)
    now = await placement(watcher)
    assert all(leader in HOLDERS - {LEADER} for leader, _ in now.values() if leader), now

    await asyncio.to_thread(nats_cluster.restart)
    await led_from(watcher, LEADER, PINNED_WITHIN)
    await send(6, 3)

    assert sorted(acked.values()) == list(range(1, 10))
    got = await messages_of(bob, chat, 9, timeout=30)
    assert [(m.seq, m.payload.decode()) for m in got] == sorted(
        (seq, key) for key, seq in acked.items())
    assert await stored_messages(bob, chat) == sorted((seq, key) for key, seq in acked.items())
    stepdowns = [(await metrics(n)).get("fenghuo_cluster_leader_stepdowns_total", 0)
                 for n in (east, south)]
    assert sum(stepdowns) > 0
