"""A fenghuo cluster over NATS JetStream (docs/DESIGN.md, Cluster).

Real processes only: three nats-servers with JetStream on loopback
(``scripts/nats_cluster.py``) and fenghuo nodes started as a user starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

import fenghuo
from fenghuo.client import FenghuoError
from fenghuo.core import (ErrorCode, FrameType, decode_ack, decode_error, decode_message,
                          encode_message, encode_publish)
from fenghuo.server.config import load
from fenghuo.server.frames import decode_frame_message
from fenghuo.server.cluster_store import DEPOSED
from fenghuo.server.node_cluster import HEADS_INTERVAL, HEADS_REPEAT
from fenghuo.server.jetstream import DEVICES, OWNERS, STREAM, Engine, Fenced, token
from scripts.nats_cluster import NatsCluster, NatsServer
from conftest import RelayProcess, start_relay
from test_cluster_setup import NatsProxy
from rawwire import authed_raw, describe, metrics, wait_for_metric
from bench.netem import LinkProfile, ProxiedConnection, Proxy
from bench.targets import free_port, free_ports, wait_listening


async def test_nats_cluster_keeps_an_r3_stream_through_a_server_kill(nats_cluster: NatsCluster):
    """The fixture's servers form one JetStream cluster: a replicated stream
    written through one server is read through another after the first is killed."""
    nc = await nats.connect(nats_cluster.urls[0])
    js = nc.jetstream()
    await js.add_stream(name="FIXTURE", subjects=["fixture.>"], num_replicas=3)
    ack = await js.publish("fixture.a", b"kept")
    await nc.close()
    nats_cluster.servers[0].kill()
    nc = await nats.connect(nats_cluster.urls[1])
    try:
        # If the killed server led the stream, the other two elect a leader
        # first (a few seconds at most); reads fail meanwhile.
        deadline = time.monotonic() + 15
        while True:
            try:
                msg = await nc.jetstream().get_msg("FIXTURE", seq=ack.seq)
                break
            except nats.errors.Error:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert msg.data == b"kept"
    finally:
        await nc.close()


def test_nats_cluster_stop_ends_every_server(tmp_path):
    cluster = NatsCluster.start()
    procs = [s.proc for s in cluster.servers]
    base = cluster.base
    assert all(p is not None and p.poll() is None for p in procs)
    cluster.stop()
    assert all(p is not None and p.poll() is not None for p in procs)
    assert not base.exists()


def test_nats_cluster_ports_are_below_the_ephemeral_range_and_a_taken_one_is_picked_again(
        tmp_path, monkeypatch):
    # A port in the ephemeral range can be taken by any outgoing connection
    # between the pick and nats-server's bind (CI: "Error listening on router
    # port ... address already in use"): the servers' ports come from below
    # it, and a server that could not bind one is started again on others.
    import scripts.nats_cluster as nats_cluster
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked: list[int] = []
    holder = socket.socket()

    def first_pick_taken(count: int, host: str = "127.0.0.1") -> int:
        first = free_ports(count, host)
        if not picked:            # the first block: hold n1's route port as someone else
            holder.bind((host, first + 4))
            holder.listen()
        picked.append(first)
        return first
    monkeypatch.setattr(nats_cluster, "free_ports", first_pick_taken)
    try:
        cluster = NatsCluster.start(tmp_path / "nats")
        try:
            assert len(picked) == 2
            ports = [p for s in cluster.servers for p in (s.port, s.route_port, s.http_port)]
            assert all(p < low for p in ports)
            assert holder.getsockname()[1] not in ports
            assert all(s.healthy() for s in cluster.servers)
        finally:
            cluster.stop()
    finally:
        holder.close()


# ---------------------------------------------------------------- nodes

LEASE = "1.5"      # --cluster-lease: a killed node is found dead 1.5 s after its last heartbeat
SECRET = "cluster-test-secret-" + "x" * 16


def start_node(tmp_path: Path, urls: list[str], name: str, *flags: str,
               timeout: float = 30.0) -> RelayProcess:
    return start_relay(tmp_path, "--cluster", ",".join(urls), "--node", name,
                       "--cluster-lease", LEASE, *flags, workers=1, secret=SECRET, timeout=timeout)


@pytest.fixture
async def nodes(tmp_path: Path, nats_cluster: NatsCluster):
    """Start fenghuo nodes on the NATS cluster: ``nodes("n0", "n1")``; stopped after.
    ``servers`` names the nats-servers they are given (default: all three; a
    node learns the others from the first it reaches, as NATS clients do), or
    ``urls`` their addresses outright (a delay proxy's)."""
    started: list[RelayProcess] = []

    def start(*names: str, flags: tuple[str, ...] = (), servers: list[NatsServer] | None = None,
              urls: list[str] | None = None, timeout: float = 30.0) -> list[RelayProcess]:
        urls = urls or ([s.url for s in servers] if servers else nats_cluster.urls)
        new = [start_node(tmp_path, urls, name, *flags, timeout=timeout) for name in names]
        started.extend(new)
        return new

    yield start
    await asyncio.gather(*(c.close() for n in started for c in n.clients), return_exceptions=True)
    # In threads, together: a node may reach NATS through a proxy this loop
    # runs, which must go on carrying its link while it stops (blocked here,
    # the node waited out its NATS timeouts until it was killed).
    await asyncio.gather(*(asyncio.to_thread(node.stop) for node in started))


RETRYABLE = (ErrorCode.INTERNAL, ErrorCode.REQUEST_TIMEOUT)


async def publish_surely(client: fenghuo.Client, channel: str, data: str, key: str,
                         deadline: float) -> fenghuo.Ack:
    """Publish until acked, retrying under the same idempotency key (PROTOCOL: INTERNAL
    and REQUEST_TIMEOUT from a cluster say "retry")."""
    while True:
        try:
            return await client.publish(channel, data, key=key)
        except FenghuoError as exc:
            if exc.code not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)

def publishing(channel: str, clients: tuple[fenghuo.Client, ...], acked: dict[str, int],
               stop: asyncio.Event, patience: float) -> list[asyncio.Task[None]]:
    """Each client publishes to ``channel`` until ``stop``, one at a time, each surely
    (``patience`` seconds per publish), its key and payload ``<user>-<i>``; ``acked``
    gets every key's acked seq."""
    async def publisher(client: fenghuo.Client) -> None:
        i = 0
        while not stop.is_set():
            key = f"{client.user}-{i}"
            acked[key] = (await publish_surely(client, channel, key, key,
                                               time.monotonic() + patience)).seq
            i += 1
    return [asyncio.create_task(publisher(c)) for c in clients]



async def messages_of(client: fenghuo.Client, channel: str, count: int,
                      timeout: float = 15.0) -> list[fenghuo.Message]:
    """The next ``count`` messages of ``channel`` at ``client`` (others are skipped)."""
    got: list[fenghuo.Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        message = await client.next_message(timeout=max(0.1, deadline - time.monotonic()))
        if message.channel == channel:
            got.append(message)
    return got


async def test_direct_and_group_messages_have_one_order_across_nodes(nodes):
    """Publishers on three nodes, one channel: every member sees the same
    gap-free seqs with the same messages, whichever node sequences it."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    alice, bob, carol = (await n0.connect("alice"), await n1.connect("bob"),
                         await n2.connect("carol"))
    created = await alice.create_group("trio", ["bob", "carol"])
    group = "group:trio"
    firsts = {}
    for c in (bob, carol):       # their nodes know the group once its first event is there
        firsts[c.user] = await messages_of(c, group, 1)
    per = 15
    await asyncio.gather(*(
        c.publish(group, f"{c.user}-{i}") for c in (alice, bob, carol) for i in range(per)))
    # The direct channel is new: its first publishes on two nodes race to own
    # it; the loser forwards to the winner (DESIGN, Cluster), so each is
    # acked once, with nothing to retry.
    dm = await asyncio.gather(*(
        c.publish("dm:alice:bob", f"{c.user}-dm-{i}") for c in (alice, bob) for i in range(per)))
    total = created["seq"] + 3 * per
    seen = {}
    for c in (alice, bob, carol):
        got = firsts.get(c.user, []) + await messages_of(c, group, total - len(firsts.get(c.user, [])))
        assert [m.seq for m in got] == list(range(1, total + 1))
        seen[c.user] = [(m.seq, m.payload) for m in got]
    assert seen["alice"] == seen["bob"] == seen["carol"]
    payloads = sorted(p for _, p in seen["alice"][created["seq"]:])
    assert payloads == sorted(f"{u}-{i}".encode() for u in ("alice", "bob", "carol")
                              for i in range(per))
    assert sorted(a.seq for a in dm) == list(range(1, 2 * per + 1))
    for c in (alice, bob):
        got = await messages_of(c, "dm:alice:bob", 2 * per)
        assert [m.seq for m in got] == list(range(1, 2 * per + 1))


async def test_first_publishes_racing_from_two_nodes_are_each_acked_once(nodes):
    """New channels published on from two nodes at the same moment: the two
    race to own each, the loser forwards its publish to the winner (which may
    still be reading the channel's tail), and each publish is acked once, with
    no error to retry (PROTOCOL §6.6): every channel gets seqs 1 and 2."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice", channels=("org.race.>",))
    bob = await n1.connect("bob", channels=("org.race.>",))
    names = [f"org.race.c{k}" for k in range(30)]
    acks = await asyncio.gather(*(c.publish(name, c.user) for name in names
                                  for c in (alice, bob)))
    assert [sorted((acks[2 * k].seq, acks[2 * k + 1].seq)) for k in range(len(names))] == [
        [1, 2]] * len(names)
    for name in names:
        page = await alice.history(name, limit=10)
        assert sorted(m.payload for m in page) == [b"alice", b"bob"]


async def hold_bucket(nc: nats.aio.client.Client, bucket: str) -> list[nats.aio.msg.Msg]:
    """Make KV ``bucket`` hold every write: its stream is replaced by a subscriber
    that answers nothing (the writes it got, returned, grow as they come)."""
    await nc.jetstream().delete_stream(f"KV_{bucket}")
    held: list[nats.aio.msg.Msg] = []

    async def hold(msg: nats.aio.msg.Msg) -> None:
        held.append(msg)                          # never answered
    await nc.subscribe(f"$KV.{bucket}.>", cb=hold)
    await nc.flush()
    return held


async def test_a_new_channel_s_first_message_is_acked_while_its_claim_is_unanswered(
        nodes, nats_cluster: NatsCluster):
    """A node that claims a channel nobody has claimed appends its first message
    beside the claim (expecting no message before it), not after the claim is
    answered: one quorum write's wait instead of two in sequence (`bench cluster
    --parts regions`: the claim alone was 141-452 ms).  The claims' bucket is
    made to hold the claim here (its stream replaced by a subscriber that
    answers nothing): the publish is acked at seq 1 all the same, and once the
    bucket answers again the node claims the channel and goes on from the
    stream, seq 2, 3, each message stored once.  The node and the holder are
    on one nats-server (see the next test), and the claim, sent beside the
    append, may reach the holder after the ack reached alice: it is waited for."""
    server = nats_cluster.servers[0]
    (n0,) = nodes("n0", servers=[server])
    alice = await n0.connect("alice", channels=("org.held.>",))
    nc = await nats.connect(server.url)
    try:
        held = await hold_bucket(nc, "fenghuo_owners")
        ack = await asyncio.wait_for(alice.publish("org.held.c", "first"), 4.0)
        assert ack.seq == 1
        deadline = time.monotonic() + 10
        while not held:                           # the claim was sent, and is not answered
            assert time.monotonic() < deadline, "the claim was not even sent"
            await asyncio.sleep(0.05)
        await nc.close()                          # the claims are answered again ...
        nc = await nats.connect(nats_cluster.urls)
        await nc.jetstream().create_key_value(bucket="fenghuo_owners", history=1, replicas=3)
        acks = [await publish_surely(alice, "org.held.c", f"m{i}", f"m{i}",
                                     time.monotonic() + 30) for i in (2, 3)]
        assert [a.seq for a in acks] == [2, 3]
        page = await alice.history("org.held.c", limit=10)
        assert [(m.seq, m.payload) for m in page] == [(1, b"first"), (2, b"m2"), (3, b"m3")]
        state = healthz(n0.metrics_port)[1]["cluster"]
        assert state["first_writes"] >= 1 and state["channels_owned"] == 1
    finally:
        await nc.close()


async def test_a_receiver_on_the_writing_node_gets_the_first_message_before_the_claim_is_answered(
        nodes, nats_cluster: NatsCluster):
    """A new direct chat whose sender and receiver are on one node: its first
    message, written beside the chat's claim, reaches the receiver there as soon
    as the stream holds it, not once the claim is answered (DESIGN, "The first
    message as one quorum write"; `bench cluster --parts regions`: 198 and 279
    ms more in the two pairs on one node).  The claims' bucket holds the claim
    (its stream replaced by a subscriber that answers nothing) until the
    receiver has seq 1; once it answers again the node claims the chat and goes
    on from the stream: seqs 2, 3, each delivered once, in order.  The node and
    the holder are on one nats-server, so the holder's subscription is there
    before the claim (across servers the claim could be refused at once, no
    responders, before the holder's interest reached the node's server)."""
    server = nats_cluster.servers[0]
    (n0,) = nodes("n0", servers=[server])
    alice, bob = await n0.connect("alice"), await n0.connect("bob")
    name = "dm:alice:bob"
    nc = await nats.connect(server.url)
    try:
        held = await hold_bucket(nc, "fenghuo_owners")
        ack = await asyncio.wait_for(alice.send("bob", "m0", key="m0"), 4.0)
        assert ack.seq == 1
        got = await messages_of(bob, name, 1)          # the claim still unanswered
        assert [(m.seq, m.payload) for m in got] == [(1, b"m0")]
        deadline = time.monotonic() + 10
        while not held:                           # the claim was sent, and is not answered
            assert time.monotonic() < deadline, "the claim was not even sent"
            await asyncio.sleep(0.05)
        await nc.close()                          # the claims are answered again ...
        nc = await nats.connect(nats_cluster.urls)
        await nc.jetstream().create_key_value(bucket="fenghuo_owners", history=1, replicas=3)
        acks = [await publish_surely(alice, name, f"m{i}", f"m{i}", time.monotonic() + 30)
                for i in (1, 2)]
        assert [a.seq for a in acks] == [2, 3]
        # ... and a fourth, after everything: bob's next messages are exactly 2, 3, 4.
        acks.append(await alice.send("bob", "m3"))
        got = await messages_of(bob, name, 3)
        assert [(m.seq, m.payload) for m in got] == [(2, b"m1"), (3, b"m2"), (4, b"m3")]
        page = await bob.history(name, limit=10)
        assert [m.seq for m in page] == [1, 2, 3, 4]
    finally:
        await nc.close()


async def test_a_first_write_the_stream_refuses_is_sent_again_never_acked_there(
        nodes, nats_cluster: NatsCluster):
    """The stream already holds a first message of the channel that nobody
    claimed (another node's first write whose node died before its claim): this
    node's first append, expecting none, is refused, stores nothing, and its
    publish is sequenced again after the stored one once this node has claimed
    the channel and read its tail: acked at seq 2, not refused, and the stream
    holds each message once."""
    (n0,) = nodes("n0")
    alice = await n0.connect("alice", channels=("org.taken.>",))
    name = "org.taken.c"
    other = await Engine.connect(nats_cluster.urls, "other-node")
    try:
        await other.append(name, 1, encode_message(name, 1, 1, "ghost", b"ghost"), 0, epoch=1)
    finally:
        await other.close()
    ack = await alice.publish(name, "mine")
    assert ack.seq == 2
    page = await alice.history(name, limit=10)
    assert [(m.seq, m.payload) for m in page] == [(1, b"ghost"), (2, b"mine")]
    state = healthz(n0.metrics_port)[1]["cluster"]
    assert (state["first_writes_refused"], state["publishes_redriven"]) == (1, 1)


async def test_a_refused_first_write_s_publish_is_acked_when_nats_drops_its_refusal(
        nodes, nats_cluster: NatsCluster):
    """As above, the stream already holds a first message nobody claimed: the
    node's first append is refused and its publish sent again, to this node
    (its claim won, taken again, the tail read), and acked at seq 2.  The
    refusal, on its way back to the client, is to be dropped; here the node's
    link to NATS is reset just as a record with that refusal crosses it (a
    proxy between node and nats-server, ``bench.netem``).  The client gets its
    ACK.  Before, the node answered its own publishes through NATS: the
    refusal was lost with the connection, its entry stayed, and swallowed the
    ACK of the publish sent again, so the client got REQUEST_TIMEOUT."""
    name = "org.lost.c"
    other = await Engine.connect(nats_cluster.urls, "other-node")
    try:
        await other.append(name, 1, encode_message(name, 1, 1, "ghost", b"ghost"), 0, epoch=1)
    finally:
        await other.close()
    server = nats_cluster.servers[0]
    cut: list[bytes] = []

    def on_connection(conn: ProxiedConnection) -> None:
        def tap(data: bytes, offset: int) -> None:
            if not cut and DEPOSED.encode() in data:
                cut.append(data)
                conn.abort()                        # lost with the connection
        conn.uplink.tap = tap
    async with Proxy(("127.0.0.1", 0), (server.host, server.port), LinkProfile(0.0),
                     record=False, on_connection=on_connection) as proxy:
        host, port = proxy.address
        # In a thread: starting a node blocks this loop, which carries its link.
        (n0,) = await asyncio.to_thread(nodes, "n0", urls=[f"nats://{host}:{port}"])
        alice = await n0.connect("alice", channels=("org.lost.>",))
        ack = await asyncio.wait_for(alice.publish(name, "mine"), 20.0)
        assert ack.seq == 2
        page = await alice.history(name, limit=10)
        assert [(m.seq, m.payload) for m in page] == [(1, b"ghost"), (2, b"mine")]
        state = healthz(n0.metrics_port)[1]["cluster"]
        assert (state["first_writes_refused"], state["publishes_redriven"]) == (1, 1)


async def test_the_far_node_s_refused_first_write_goes_to_the_winner_acked_once(
        nodes, nats_cluster: NatsCluster):
    """Both participants of new direct chats write their first messages at once,
    from two nodes; one node is 150 ms from NATS (another region), so the near
    node's append and claim land first.  The far node's first append, expecting
    no message, is refused by the stream: its publishes are sent to the winner
    and acked there once, with no error to retry; every chat holds each message
    once, gap-free, each sender's in its order, and both participants get them
    live in that order."""
    with near_and_far(nodes, nats_cluster) as (n0, n1):
        pairs = [(await n0.connect(f"a{k}"), await n1.connect(f"b{k}")) for k in range(4)]

        async def burst(client: fenghuo.Client, to: str) -> list[fenghuo.Ack]:
            sent = [asyncio.ensure_future(client.send(to, f"{client.user}-{i}")) for i in range(3)]
            return list(await asyncio.gather(*sent))
        runs = await asyncio.gather(*(burst(c, to.user) for a, b in pairs
                                      for c, to in ((a, b), (b, a))))
        for k, (a, b) in enumerate(pairs):
            name = f"dm:{a.user}:{b.user}"
            by_seq = {}
            for client, acks in ((a, runs[2 * k]), (b, runs[2 * k + 1])):
                assert [x.seq for x in acks] == sorted(x.seq for x in acks), (name, acks)
                by_seq.update({x.seq: f"{client.user}-{i}".encode() for i, x in enumerate(acks)})
            assert sorted(by_seq) == list(range(1, 7)), name
            page = await a.history(name, limit=10)
            assert [(m.seq, m.payload) for m in page] == sorted(by_seq.items())
            for client in (a, b):
                got = await messages_of(client, name, 6)
                assert [(m.seq, m.payload) for m in got] == sorted(by_seq.items()), client.user
        far = healthz(n1.metrics_port)[1]["cluster"]
        assert far["first_writes_refused"] >= 1 and far["publishes_redriven"] >= 1, far


async def test_a_claim_winner_that_read_the_tail_early_takes_the_far_first_write(
        nodes, nats_cluster: NatsCluster):
    """A node claims a channel (a subscriber needs it) and reads its empty tail;
    a node 150 ms from NATS, whose watch has not shown that claim yet, writes
    the channel's first message: its append, expecting none, is stored (acked,
    seq 1) and its claim lost.  It gives the stored frames to the winner, which
    continues after them: the subscriber there gets seq 1 live, and the next
    publish, forwarded to the winner, is seq 2, not refused by the stream as
    the winner's append of a seq 1 of its own would be."""
    with near_and_far(nodes, nats_cluster) as (n0, n1):
        bob = await n0.connect("bob", channels=("org.early.>",))
        alice = await n1.connect("alice", channels=("org.early.>",))
        for k in range(3):
            name = f"org.early.c{k}"
            await bob.subscribe(name)                    # n0 claims it, tail empty
            first = await alice.publish(name, "first")   # n1 writes it first
            second = await alice.publish(name, "second")
            assert (first.seq, second.seq) == (1, 2), name
            got = await messages_of(bob, name, 2)
            assert [(m.seq, m.payload) for m in got] == [(1, b"first"), (2, b"second")]
            page = await bob.history(name, limit=10)
            assert [(m.seq, m.payload) for m in page] == [(1, b"first"), (2, b"second")]
        states = [healthz(n.metrics_port)[1]["cluster"] for n in (n0, n1)]
        assert states[1]["channels_owned"] == 0 and states[1]["first_writes"] == 3, states


async def test_the_writing_node_s_own_receivers_get_each_message_once_when_its_claim_is_lost(
        nodes, nats_cluster: NatsCluster):
    """A new direct chat claimed first by a node near NATS (a participant there
    reads its history: the tail is empty), then written first by the node 150
    ms from NATS, whose watch has not shown that claim yet: its append is stored
    (seq 1) and its claim lost.  The receiver on that writing node gets seq 1
    from its own store, before the claim is settled, and then the winner's
    messages as a replica: each message once, in order, on both nodes."""
    with near_and_far(nodes, nats_cluster) as (n0, n1):
        for k in range(3):
            a, b = f"a{k}", f"b{k}"
            name = f"dm:{a}:{b}"
            b_near = await n0.connect(b)
            alice, b_far = await n1.connect(a), await n1.connect(b)
            assert await b_near.history(name, limit=10) == []   # n0 claims it, tail empty
            first = await alice.send(b, "first")                # n1 writes it first
            second = await alice.send(b, "second")              # forwarded to n0
            third = await alice.send(b, "third")
            assert (first.seq, second.seq, third.seq) == (1, 2, 3), name
            expected = [(1, b"first"), (2, b"second"), (3, b"third")]
            for client in (b_far, b_near):
                got = await messages_of(client, name, 3)
                assert [(m.seq, m.payload) for m in got] == expected, (name, client)
            # Once each: the next message of the chat at either is a fourth.
            assert (await alice.send(b, "fourth")).seq == 4
            for client in (b_far, b_near):
                got = await messages_of(client, name, 1)
                assert [(m.seq, m.payload) for m in got] == [(4, b"fourth")], (name, client)
        states = [healthz(n.metrics_port)[1]["cluster"] for n in (n0, n1)]
        assert states[1]["channels_owned"] == 0 and states[1]["first_writes"] == 3, states


async def test_a_receiver_s_node_that_won_the_claim_gets_the_stored_first_message_at_once(
        nodes, nats_cluster: NatsCluster):
    """A new direct chat claimed by its receiver's node (bob reads its history
    there: the tail is empty), then written first by the sender's node, 400 ms
    from NATS, whose watch has not shown that claim yet: its append is stored
    (seq 1) and its own claim is held (the claims' bucket replaced by a
    subscriber that answers nothing).  The receiver's node, owning the chat,
    drops the stored message announced to it; it gets it from the writer's
    ``first`` control, sent as soon as the append is stored, not once the
    writer's claim is answered (`bench cluster --parts regions`: 918 ms after
    the append's answer, Frankfurt -> Sydney): bob gets seq 1 while that claim
    is unanswered.  Once the bucket answers again (holding the winner's claim
    as before), the winner continues after the stored message: seqs 2-4, each
    delivered once, in order."""
    name = "dm:alice:bob"
    with near_and_far(nodes, nats_cluster, delay="400ms") as (n0, n1):
        bob = await n0.connect("bob")
        alice = await n1.connect("alice", presence=True)
        await until(lambda: _online(alice, "bob"), timeout=20)   # n1 announces the chat to n0
        assert await bob.history(name, limit=10) == []        # n0 claims it, tail empty
        nc = await nats.connect(nats_cluster.servers[0].url)
        try:
            winner = await (await nc.jetstream().key_value(OWNERS)).get(token(name))
            # n1 learns that claim 400 ms after it was made: the publish gets
            # there first, and its claim reaches NATS 400 ms after that.
            sending = asyncio.ensure_future(alice.send("bob", "m0", key="m0"))
            held = await hold_bucket(nc, OWNERS)
            assert (await asyncio.wait_for(sending, 10.0)).seq == 1
            got = await messages_of(bob, name, 1)
            assert [(m.seq, m.payload) for m in got] == [(1, b"m0")]
            assert held, "the writer's claim was answered before the bucket was held"
            state = healthz(n1.metrics_port)[1]["cluster"]
            assert state["first_writes"] == 1, state
            await nc.close()                      # the claims are answered again ...
            nc = await nats.connect(nats_cluster.urls)
            kv = await nc.jetstream().create_key_value(bucket=OWNERS, history=1, replicas=3)
            await kv.create(winner.key, winner.value)   # ... the winner's claim still there
            acks = [await publish_surely(alice, name, f"m{i}", f"m{i}", time.monotonic() + 30)
                    for i in (1, 2, 3)]
            assert [a.seq for a in acks] == [2, 3, 4]
            got = await messages_of(bob, name, 3)
            assert [(m.seq, m.payload) for m in got] == [(2, b"m1"), (3, b"m2"), (4, b"m3")]
            # Once each: the next message bob gets is a fifth.
            assert (await alice.send("bob", "m4")).seq == 5
            got = await messages_of(bob, name, 1)
            assert [(m.seq, m.payload) for m in got] == [(5, b"m4")]
            page = await bob.history(name, limit=10)
            assert [(m.seq, m.payload) for m in page] == [
                (1, b"m0"), (2, b"m1"), (3, b"m2"), (4, b"m3"), (5, b"m4")]
            states = [healthz(n.metrics_port)[1]["cluster"] for n in (n0, n1)]
            assert [s["channels_owned"] for s in states] == [1, 0], states
        finally:
            await nc.close()


class WritesHeld(NatsProxy):
    """A TCP proxy to a nats-server that holds what its client publishes on
    subjects beginning ``prefix`` (a KV bucket's writes: ``$KV.<bucket>.``) while
    ``holding``; everything else passes both ways, the bucket's watch too."""

    def __init__(self, target: tuple[str, int], prefix: str) -> None:
        super().__init__(target)
        self.prefix = prefix.encode()
        self.holding = False
        self.held: list[bytes] = []

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            if (self.holding and words[:1] in ([b"PUB"], [b"HPUB"])
                    and words[1].startswith(self.prefix)):
                self.held.append(frame)                  # never sent
                continue
            writer.write(frame)
        writer.close()


async def _first_publish_parked(alice: fenghuo.Client, claims: WritesHeld, name: str
                                ) -> tuple[asyncio.Future[list[fenghuo.Message]],
                                           asyncio.Future[fenghuo.Ack]]:
    """alice, on the node behind ``claims``, reads the new direct chat ``name`` (her
    node claims it, the claim held) and sends its first message, m0 to bob:
    parked there, as nobody else claims the chat while bob is offline.  The
    history read and the send, both still waiting."""
    claims.holding = True
    reading = asyncio.ensure_future(alice.history(name, limit=10))   # her node claims the chat

    async def claim_held() -> bool:
        return bool(claims.held)
    await until(claim_held)
    sending = asyncio.ensure_future(alice.send("bob", "m0", key="m0"))
    await asyncio.sleep(1.0)                   # parked (no event to wait for outside n1)
    return reading, sending


async def test_a_first_publish_parked_behind_a_lookup_goes_to_the_owner_the_watch_names(
        nodes, nats_cluster: NatsCluster):
    """A node looking up who owns a new direct chat (alice reads its history
    there: her node claims it) holds alice's first publish until it knows.
    Here its claim is held on the way to NATS (a proxy keeps the claims'
    bucket's writes), and bob's node claims the chat when bob comes online
    and wins: the
    claims' watch names bob's node to alice's, which sends the parked publish
    (and its interest in the chat) there at once, not once its own lookup ends
    (`bench cluster --parts regions --regions-claim-by receiver`: the first
    message waited 334-775 ms behind that lookup, a failed create and a read
    across regions).  n0 stores it, and alice gets her ack and her history,
    while her node's claim is still held, before that claim's try times out (no
    "cannot resolve" retry in n1's log: without the watch, that time-out and
    the retry's read, 5.5 s on, were what sent the publish).  Once the claim
    goes through (refused: bob's node holds the chat), the chat goes on: the
    stream holds each message once, in order."""
    server = nats_cluster.servers[0]
    name = "dm:alice:bob"
    proxy = WritesHeld((server.host, server.port), f"$KV.{OWNERS}.")
    url = await proxy.start()
    try:
        (n0,) = nodes("n0", servers=[server])
        (n1,) = await asyncio.to_thread(nodes, "n1", urls=[url])   # the loop runs the proxy
        alice = await n1.connect("alice")
        reading, sending = await _first_publish_parked(alice, proxy, name)
        # On n0, which n1 told of the new chat: bob is subscribed to it, and n0
        # claims it for him (answered: it wins) before WELCOME.
        bob = await n0.connect("bob")

        # Online on n0 as m0 is sequenced there: he gets it live, whichever of
        # his WELCOME and m0's release comes first (the test after this one
        # makes the release come first).
        got = await messages_of(bob, name, 1)
        assert [(m.seq, m.payload) for m in got] == [(1, b"m0")]
        page = await bob.history(name, limit=10)
        assert [(m.seq, m.payload) for m in page] == [(1, b"m0")]
        assert (await asyncio.wait_for(sending, 10.0)).seq == 1
        # Served once n1's replica is fed: before or after m0 was stored.
        assert [m.seq for m in await asyncio.wait_for(reading, 10.0)] in ([], [1])
        assert "cannot resolve a channel's owner" not in n1.log(), \
            "the publish waited for n1's lookup to time out"
        assert proxy.holding and proxy.held, "n1's claim was answered"
        state = healthz(n1.metrics_port)[1]["cluster"]
        assert state["parked_sent_on_watch"] >= 1 and state["channels_owned"] == 0, state
        proxy.holding = False                 # n1's next writes pass (the held one never)
        acks = [await publish_surely(alice, name, f"m{i}", f"m{i}", time.monotonic() + 30)
                for i in (1, 2)]
        assert [a.seq for a in acks] == [2, 3]
        page = await alice.history(name, limit=10)
        assert [(m.seq, m.payload) for m in page] == [(1, b"m0"), (2, b"m1"), (3, b"m2")]
        states = [healthz(n.metrics_port)[1]["cluster"] for n in (n0, n1)]
        assert [s["channels_owned"] for s in states] == [1, 0], states
    finally:
        await proxy.close()


class RequestsHeld(NatsProxy):
    """A TCP proxy to a nats-server that holds the requests its client publishes
    on the subjects a rule picks (``rules``: a name -> a test of the subject)
    while that rule is held (:meth:`hold`), until :meth:`release` sends them on;
    everything else passes both ways."""

    def __init__(self, target: tuple[str, int], **rules: Callable[[bytes], bool]) -> None:
        super().__init__(target)
        self.rules = rules
        self.holding: set[str] = set()
        self.held: dict[str, list[tuple[asyncio.StreamWriter, bytes]]] = {}

    def hold(self, *rules: str) -> None:
        self.holding.update(rules)

    def release(self, rule: str) -> None:
        self.holding.discard(rule)
        for writer, frame in self.held.pop(rule, []):
            writer.write(frame)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            rule = next((r for r in self.holding
                         if words[:1] in ([b"PUB"], [b"HPUB"]) and self.rules[r](words[1])),
                        None)
            if rule is not None:
                self.held.setdefault(rule, []).append((writer, frame))
                continue
            writer.write(frame)
        writer.close()


async def test_a_receiver_whose_welcome_waits_gets_a_message_sequenced_meanwhile_live(
        nodes, nats_cluster: NatsCluster):
    """bob's subscription to a new direct chat takes effect on n0 in the step
    that sequences the chat's first message there (a forward n0 deferred while
    it took the chat), before that message is stored; his WELCOME goes out only
    after it was stored and delivered to the chat's subscribers (his synced
    positions, read from the devices' bucket, are held on the way to NATS
    meanwhile).  He still gets it, once, right after WELCOME: his subscription
    took effect after what had been delivered then (the ring's head), not
    after the seq, which counted m0 on its way to the stream, and WELCOME's
    head for the chat says so (DESIGN, "A subscription that starts later").
    Before, his catch-up started after m0, whose fan-out had gone without
    him, and WELCOME's head made the client take m0 as history: he never
    received it."""
    server = nats_cluster.servers[0]
    name = "dm:alice:bob"
    claims = WritesHeld((server.host, server.port), f"$KV.{OWNERS}.")
    reads = RequestsHeld(
        (server.host, server.port),
        tail=lambda subject: subject == f"$JS.API.STREAM.MSG.GET.{STREAM}".encode(),
        positions=lambda subject: subject.startswith(
            (f"$JS.API.DIRECT.GET.KV_{DEVICES}".encode(),
             f"$JS.API.STREAM.MSG.GET.KV_{DEVICES}".encode())))
    claims_url, reads_url = await claims.start(), await reads.start()
    try:
        (n0,) = await asyncio.to_thread(nodes, "n0", urls=[reads_url])  # the loop runs the proxies
        (n1,) = await asyncio.to_thread(nodes, "n1", urls=[claims_url])
        alice = await n1.connect("alice")
        reading, sending = await _first_publish_parked(alice, claims, name)
        # n0 claims the chat for bob and wins; its read of the chat's tail is
        # held, so m0, sent there by n1 once its watch names n0, is deferred.
        reads.hold("tail", "positions")
        connecting = asyncio.ensure_future(n0.connect("bob"))

        async def deferred() -> bool:
            state = (await asyncio.to_thread(healthz, n0.metrics_port))[1]
            return state.get("cluster", {}).get("forwards_deferred", 0) >= 1
        await until(deferred)
        # n0 takes the chat: m0 is sequenced, bob's subscription takes effect,
        # m0 is stored and delivered (alice's ack), while his WELCOME waits.
        reads.release("tail")
        assert (await asyncio.wait_for(sending, 10.0)).seq == 1
        assert not connecting.done(), "bob's WELCOME did not wait for his positions"
        reads.release("positions")
        bob = await asyncio.wait_for(connecting, 10.0)
        got = await messages_of(bob, name, 1)
        assert [(m.seq, m.payload) for m in got] == [(1, b"m0")]
        claims.holding = False
        ack = await publish_surely(alice, name, "m1", "m1", time.monotonic() + 30)
        got = await messages_of(bob, name, 1)    # m1 next: m0 came once
        assert [(m.seq, m.payload) for m in got] == [(ack.seq, b"m1")] and ack.seq == 2
        assert [m.seq for m in await asyncio.wait_for(reading, 10.0)] in ([], [1])
    finally:
        await claims.close()
        await reads.close()


async def _online(client: fenghuo.Client, user: str) -> bool:
    return bool((await client.presence([user]))[user]["online"])


async def test_a_new_direct_chat_reaches_a_participant_s_node_without_its_asking(nodes):
    """The node that claims a new direct chat tells the nodes where a participant
    is online, ahead of the chat's first message, that it sends them the chat
    from its head on: such a node is ready at once instead of after its own
    claim of the chat has failed, the winner read and its interest answered
    (``bench cluster --parts regions``: up to 830 ms more for the first
    message).  Every message arrives once, in order, from seq 1."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice", presence=True)
    bob = await n1.connect("bob")
    deadline = time.monotonic() + 10
    while not (await alice.presence(["bob"]))["bob"]["online"]:
        assert time.monotonic() < deadline, "bob on n1 never seen online from n0"
        await asyncio.sleep(0.1)
    for i in range(3):
        await alice.send("bob", f"m{i}")
    got = await messages_of(bob, "dm:alice:bob", 3)
    assert [(m.seq, m.payload) for m in got] == [(1, b"m0"), (2, b"m1"), (3, b"m2")]
    # Usually alice's node wins the claim (it has the publish in hand), and
    # bob's node, racing it, is told.  When bob's node wins, alice's node
    # wrote the first message beside its lost claim (DESIGN, "The first
    # message as one quorum write") and is a replica from it, not told.
    states = [healthz(n.metrics_port)[1]["cluster"] for n in (n0, n1)]
    assert sorted(state["channels_owned"] for state in states) == [0, 1]
    if states[0]["channels_owned"]:
        assert states[1]["chats_received_unasked"] == 1
    else:
        assert states[0]["first_writes"] == 1 and states[0]["chats_received_unasked"] == 0


HIDDEN = {"online": False, "devices": 0, "hidden": True}


async def test_reading_a_never_messaged_direct_chat_makes_it_on_no_node(nodes):
    """PROTOCOL §3.15a, §5.1: alice reads a direct chat that has had no message on
    a node where neither participant had connected (it cannot know the chat
    there): an empty page, and the chat is made on no node.  bob, online on
    another node, is not shown her presence, nor she his (§3.17); nobody is
    subscribed (bob's WELCOME on a third node lists no channel); the first
    message, sent afterwards, is seq 1, and from it on each sees the other.
    Before, the read made the chat on that node, which told every node of it."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    bob = await n0.connect("bob")
    alice = await n2.connect("alice")
    assert await alice.history("dm:alice:bob", limit=10) == []
    for _ in range(10):       # what n2 sends the other nodes on a read reaches them by then
        assert (await bob.presence(["alice"]))["alice"] == HIDDEN
        assert (await alice.presence(["bob"]))["bob"] == HIDDEN
        await asyncio.sleep(0.1)
    later = await n1.connect("bob")
    assert later.welcome["channels"] == {}
    assert (await alice.history("dm:alice:bob", limit=10)) == []   # read again: still nothing
    assert (await bob.send("alice", "hello")).seq == 1
    for client in (alice, later):
        got = await messages_of(client, "dm:alice:bob", 1)
        assert [(m.seq, m.payload) for m in got] == [(1, b"hello")]
    assert (await bob.presence(["alice"]))["alice"]["online"]
    assert (await alice.presence(["bob"]))["bob"]["online"]


async def test_a_refused_or_cancelled_schedule_makes_a_direct_chat_on_no_node(nodes):
    """PROTOCOL §5.1, §3.17a: a SCHEDULE to a direct chat that has had no message,
    refused after its access check (`send_at` too far ahead) or accepted then
    cancelled, makes the chat on no node, as a read does (above): nobody is shown
    the other's presence, bob's WELCOME on a third node lists no channel.  Before,
    the check made the chat on alice's node, which told every node of it."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    bob = await n0.connect("bob")
    alice = await n2.connect("alice")
    with pytest.raises(FenghuoError) as refused:
        await alice.schedule("dm:alice:bob", "x", time.time() + 400 * 86400)
    assert refused.value.code == ErrorCode.MALFORMED_BODY
    pending = await alice.schedule("dm:alice:bob", "x", time.time() + 60)
    await alice.cancel_scheduled(pending.id)
    for _ in range(10):       # what n2 would send the other nodes reaches them by then
        assert (await bob.presence(["alice"]))["alice"] == HIDDEN
        assert (await alice.presence(["bob"]))["bob"] == HIDDEN
        await asyncio.sleep(0.1)
    later = await n1.connect("bob")
    assert later.welcome["channels"] == {}


class NodeRecordsDropped(NatsProxy):
    """A TCP proxy to a nats-server that drops, while ``dropping``, the node records
    (``fh.node.*``) it delivers to its client that name ``needle``: as core NATS
    loses them over a reconnect.  Everything else passes, both ways."""

    def __init__(self, target: tuple[str, int], needle: bytes) -> None:
        super().__init__(target)
        self.needle = needle
        self.dropping = False
        self.dropped = 0

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            if (self.dropping and words[:1] in ([b"MSG"], [b"HMSG"])
                    and words[1].startswith(b"fh.node.") and self.needle in frame):
                self.dropped += 1
                continue
            writer.write(frame)
        writer.close()


async def test_a_direct_chat_s_messages_are_read_on_nodes_that_did_not_know_it(
        nodes, nats_cluster: NatsCluster):
    """alice's message to bob, sent on n0, is in the history her other devices
    read on n1 (told of the new chat by n0, or not yet) within live delivery's
    time of its ACK, which is what PROTOCOL §3.15a promises a connection held
    elsewhere (read-your-writes is the ACK's own connection's), and on n2, which
    never heard of the chat (every node record naming it was lost on the way
    there): n2 finds it from the chat's owner and opens the chat, so bob,
    connecting there, receives it and the next one."""
    server = nats_cluster.servers[2]
    name = "dm:alice:bob"
    proxy = NodeRecordsDropped((server.host, server.port), name.encode())
    url = await proxy.start()
    try:
        n0, n1 = nodes("n0", "n1")
        (n2,) = await asyncio.to_thread(nodes, "n2", urls=[url])   # the loop runs the proxy
        alice = await n0.connect("alice")
        on_n1, on_n2 = await n1.connect("alice"), await n2.connect("alice")
        proxy.dropping = True
        assert (await alice.send("bob", "m0")).seq == 1

        async def read_on_n1() -> list[tuple[int, bytes]]:
            # n1's copy may not have m0 yet at its ACK on n0 (a CI run at load
            # 2-3 read [] there); it must have it within live delivery's time.
            return [(m.seq, m.payload) for m in await on_n1.history(name, limit=10)]
        assert await until(read_on_n1) == [(1, b"m0")]

        async def settled() -> bool:           # claimed by n0 or n1 (alice is there too)
            states = [(await asyncio.to_thread(healthz, n.metrics_port))[1]["cluster"]
                      for n in (n0, n1)]
            return sum(state["channels_owned"] for state in states) == 1
        await until(settled)                   # its owner sends n2 nothing more unasked
        await asyncio.sleep(0.5)
        assert proxy.dropped >= 1, "n2 was not told of the chat: nothing to lose"
        assert (await metrics(n2))["fenghuo_channels"] == 0, "n2 knows the chat"
        proxy.dropping = False
        page = await on_n2.history(name, limit=10)
        assert [(m.seq, m.payload) for m in page] == [(1, b"m0")]
        bob = await n2.connect("bob")           # a new device: m0 is history to it
        assert bob.welcome["channels"] == {name: 1}, bob.welcome
        assert (await alice.send("bob", "m1")).seq == 2
        assert [(m.seq, m.payload) for m in await messages_of(bob, name, 1)] == [(2, b"m1")]
    finally:
        await proxy.close()


async def test_a_sender_s_publishes_keep_their_order_while_its_node_learns_the_owner(
        nodes, nats_cluster: NatsCluster):
    """A node far from NATS (150 ms each way, as between regions) gets publishes
    on a channel another node has just claimed: the first waits (parked) while
    the node asks who owns it; the claims' watch can name the owner before that
    answer, and publishes sent then must not overtake the parked ones (PROTOCOL
    §6.3; `bench cluster --parts regions` saw seqs out of send order)."""
    with near_and_far(nodes, nats_cluster) as (n0, n1):
        alice = await n0.connect("alice", channels=("org.far.>",))
        bob = await n1.connect("bob", channels=("org.far.>",))
        for k in range(3):
            name = f"org.far.c{k}"
            await alice.publish(name, "alice")           # n0 sequences it
            sending = []
            for i in range(12):                          # over the watch's arrival
                sending.append(asyncio.ensure_future(bob.publish(name, str(i))))
                await asyncio.sleep(0.04)
            seqs = [ack.seq for ack in await asyncio.gather(*sending)]
            assert seqs == list(range(2, 14)), (name, seqs)


async def test_a_sender_s_publishes_keep_their_order_while_its_node_claims_the_channel(
        nodes, nats_cluster: NatsCluster):
    """A node far from NATS (150 ms each way) claims a new channel for its
    sender's first publish, which waits (parked) meanwhile; the sender goes on
    publishing without waiting for acks.  Once the claim is won, the parked
    publish is sequenced here at once, not sent to this very node over NATS
    (a round trip through the far link) while the publishes arriving meanwhile,
    finding the channel owned here, went ahead of it (PROTOCOL §6.3; `bench
    cluster --parts regions`: a sender's own node owning the chat, seqs out of
    send order)."""
    nats = nats_cluster.servers[0]
    with far_link(nats) as url:
        (n0,) = nodes("n0", urls=[url])
        alice = await n0.connect("alice", channels=("org.own.>",))
        for name, send in (("org.own.c0", lambda i: alice.publish("org.own.c0", str(i))),
                           ("dm:alice:bob", lambda i: alice.send("bob", str(i)))):
            sending = []
            for i in range(30):                          # over the claim and a round trip
                sending.append(asyncio.ensure_future(send(i)))
                await asyncio.sleep(0.04)
            seqs = [ack.seq for ack in await asyncio.gather(*sending)]
            assert seqs == list(range(1, 31)), (name, seqs)


@contextlib.contextmanager
def far_link(server: NatsServer, delay: str = "150ms") -> Iterator[str]:
    """A NATS URL that reaches ``server`` through a delay proxy (``bench.netem``,
    ``delay`` each way), as a node in another region does.  Its own process:
    starting a node blocks the test's loop, which must not stall the link."""
    port = free_port()
    far = subprocess.Popen([sys.executable, "-m", "bench.netem", "--listen", f"127.0.0.1:{port}",
                            "--upstream", f"{server.host}:{server.port}", "--delay", delay],
                           cwd=Path(__file__).parent.parent)
    try:
        wait_listening(far, "127.0.0.1", port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        far.terminate()
        far.wait(10)


@contextlib.contextmanager
def near_and_far(nodes, nats_cluster: NatsCluster,
                 delay: str = "150ms") -> Iterator[tuple[RelayProcess, RelayProcess]]:
    """Nodes ``n0`` on the first nats-server and ``n1`` ``delay`` from it (another region)."""
    server = nats_cluster.servers[0]
    with far_link(server, delay) as url:
        (n0,) = nodes("n0", servers=[server])
        # Its start makes a few dozen round trips to NATS, each 2 x delay: 30 s
        # was passed at a load of 10 (a land on 2026-12-06, 400 ms).
        (n1,) = nodes("n1", urls=[url], timeout=90.0)
        yield n0, n1


async def send_while_away(alice: fenghuo.Client, bob: fenghuo.Client) -> None:
    """``m0`` from alice to bob, received; bob leaves; ``m1``-``m5`` (seqs 2-6) while he is away."""
    await alice.send("bob", "m0")
    assert (await messages_of(bob, "dm:alice:bob", 1))[0].seq == 1
    await bob.close()
    acks = [await alice.send("bob", f"m{i}") for i in range(1, 6)]
    assert [a.seq for a in acks] == list(range(2, 7))


async def test_history_and_catch_up_on_a_node_that_never_saw_them(nodes):
    """Messages sent while their receiver was away, caught up on a node started
    after them, with rings too small to hold them: served from the stream."""
    flags = ("--ring-size", "2")
    n0, n1 = nodes("n0", "n1", flags=flags)
    alice = await n0.connect("alice")
    bob = await n1.connect("bob")
    await send_while_away(alice, bob)
    (n2,) = nodes("n2", flags=flags)
    # The same device moves to a node that never saw the chat: its positions
    # and epoch go with it, as the client's reconnect to another node does.
    moved = n2.client("bob")
    moved.positions, moved.epoch = dict(bob.positions), bob.epoch
    await moved.connect()
    got = await messages_of(moved, "dm:alice:bob", 5)
    assert [(m.seq, m.payload) for m in got] == [(i, f"m{i - 1}".encode()) for i in range(2, 7)]
    page = await moved.history("dm:alice:bob", limit=10)
    assert [m.seq for m in page] == list(range(1, 7))
    older = await moved.history("dm:alice:bob", before=4, limit=2)
    assert [m.seq for m in older] == [2, 3]
    first = await moved.history("dm:alice:bob", after=0, limit=3)
    assert [m.payload for m in first] == [b"m0", b"m1", b"m2"]


async def test_owner_killed_another_node_sequences_on(nodes):
    """kill -9 of the node sequencing a channel under load: another node takes
    it over within a bounded time, seqs continue with no gap and no reuse, and
    every acked message is stored once."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    alice = await n0.connect("alice")
    bob = await n1.connect("bob", reconnect=False)
    carol = await n2.connect("carol", reconnect=False)
    await alice.create_group("crew", ["bob", "carol"])      # n0 sequences group:crew
    group = "group:crew"
    for c in (bob, carol):       # their nodes know the group once its first event is there
        await messages_of(c, group, 1)
    acked: dict[str, int] = {}
    stop = asyncio.Event()

    tasks = publishing(group, (bob, carol), acked, stop, patience=30)
    await asyncio.sleep(1.0)
    before = len(acked)
    n0.kill()
    killed = time.monotonic()
    while len(acked) <= before + 2 and time.monotonic() - killed < 20:
        await asyncio.sleep(0.05)
    resumed = time.monotonic() - killed
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(acked) > before + 2, "no publish was acked after the owner died"
    # Bounded: the lease (1.5 s) plus a claim and a tail read, with room for a busy machine.
    assert resumed < 15
    seqs = sorted(acked.values())
    assert len(set(seqs)) == len(seqs), "a seq was given twice"
    stored: list[tuple[int, str]] = []
    while page := await bob.history(group, after=stored[-1][0] if stored else 0, limit=100):
        stored += [(m.seq, m.payload.decode()) for m in page]
    assert [s for s, _ in stored] == list(range(1, len(stored) + 1))
    texts = [p for _, p in stored if not p.startswith("{")]
    assert len(texts) == len(set(texts)), "a message was stored twice"
    by_key = {p: s for s, p in stored}
    assert all(by_key.get(key) == seq for key, seq in acked.items())


async def stored_messages(client: fenghuo.Client, channel: str) -> list[tuple[int, str]]:
    """``channel`` as HISTORY on ``client``'s node serves it: (seq, payload) of each."""
    stored: list[tuple[int, str]] = []
    while page := await client.history(channel, after=stored[-1][0] if stored else 0, limit=100):
        stored += [(m.seq, m.payload.decode()) for m in page]
    return stored


async def test_one_channel_with_many_publishes_in_flight_from_three_nodes(nodes):
    """Publishers on three nodes keep 100 publishes each in flight on one
    group: its owner stores what arrives while an append is in flight in
    the next one (DESIGN, Cluster: group commit), and still every publish is
    acked with a seq of its own, each sender's in its sending order, the
    stream holds each once, gap-free, at its acked seq, and every member
    receives them live in that order."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    clients = (await n0.connect("alice"), await n1.connect("bob"), await n2.connect("carol"))
    created = await clients[0].create_group("load", ["bob", "carol"])   # n0 sequences it
    group = "group:load"
    for c in clients[1:]:        # their nodes know the group once its first event is there
        await messages_of(c, group, 1)
    per = 100
    keys = [(c, f"{c.user}-{i}") for c in clients for i in range(per)]
    acks = await asyncio.gather(*(c.publish(group, key, key=key) for c, key in keys))
    acked = {key: ack.seq for (_, key), ack in zip(keys, acks)}
    head = created["seq"] + 3 * per
    assert sorted(acked.values()) == list(range(created["seq"] + 1, head + 1))
    for c in clients:
        seqs = [acked[f"{c.user}-{i}"] for i in range(per)]
        assert seqs == sorted(seqs), f"{c.user}'s publishes sequenced out of their order"
    stored = await stored_messages(clients[2], group)
    assert [seq for seq, _ in stored] == list(range(1, head + 1))
    assert {p: s for s, p in stored if p in acked} == acked
    for c in clients:
        seen = 1 if c is not clients[0] else 0
        live = await messages_of(c, group, head - seen)
        assert [m.seq for m in live] == list(range(seen + 1, head + 1))
    with urllib.request.urlopen(f"http://127.0.0.1:{n0.metrics_port}/healthz", timeout=5) as r:
        state = json.load(r)["cluster"]
    assert state["appended"] == head and state["refused"] == 0
    assert state["appends"] < state["appended"], "no append held more than one message"


async def test_a_paused_owner_with_appends_in_flight_is_fenced_and_nothing_conflicts(nodes):
    """The owner is stopped (SIGSTOP past its lease) while its publisher keeps
    100 publishes in flight; another node takes the channel over. Resumed,
    whatever the old owner had in flight or sequenced since is refused (the
    stream or its watch of the claims), its publisher retries under the same
    keys: every publish acked once with a seq of its own, the stream gap-free
    with each message once, at its acked seq."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    bob = await n1.connect("bob")
    await alice.create_group("pair", ["bob"])               # n0 sequences group:pair
    group = "group:pair"
    await messages_of(bob, group, 1)
    acked: dict[str, int] = {}

    async def publish(key: str) -> None:
        acked[key] = (await publish_surely(alice, group, key, key, time.monotonic() + 60)).seq

    tasks = [asyncio.create_task(publish(f"a-{i}")) for i in range(100)]
    while len(acked) < 5:
        await asyncio.sleep(0.001)
    n0.signal(signal.SIGSTOP)
    try:
        acked["b-0"] = (await publish_surely(bob, group, "b-0", "b-0",
                                             time.monotonic() + 30)).seq
    finally:
        n0.signal(signal.SIGCONT)
    await asyncio.gather(*tasks)
    assert len(acked) == 101
    assert len(set(acked.values())) == 101, "a seq was given twice"
    stored = await stored_messages(bob, group)
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    texts = [p for _, p in stored if p in acked]
    assert len(texts) == len(set(texts)) == 101, "a message was stored twice, or lost"
    assert {p: s for s, p in stored if p in acked} == acked


async def test_a_deposed_owners_batch_is_refused_whole(nats_cluster: NatsCluster):
    """Appends holding several messages, on the real engine: read back one
    by one (from inside a batch too); a new owner continues after the old
    owner's batch; the old owner's next batch, expecting the tail it knew, is
    refused whole; a batch retried after its answer was lost is acked once."""
    old = await Engine.connect(nats_cluster.urls, "old-owner")
    new = await Engine.connect(nats_cluster.urls[1:], "new-owner")
    name = "dm:u:v"

    def batch(seqs: range, who: str) -> bytes:
        return b"".join(encode_message(name, seq, seq, who, f"{who}-{seq}".encode())
                        for seq in seqs)
    try:
        at = await old.append(name, 1, batch(range(1, 4), "old"), 0, epoch=1)
        assert await old.append(name, 1, batch(range(1, 4), "old"), 0, epoch=1) == at
        tail = await new.last(name)
        assert tail is not None and (tail.seq, tail.stream_seq) == (3, at)
        await new.append(name, 4, batch(range(4, 6), "new"), tail.stream_seq, epoch=2)
        with pytest.raises(Fenced):
            await old.append(name, 4, batch(range(4, 9), "old"), at, epoch=1)
        stored = await new.read(name, 0, 100, 100)
        assert [(m.seq, decode_frame_message(m.frame).sender) for m in stored] == [
            (1, "old"), (2, "old"), (3, "old"), (4, "new"), (5, "new")]
        assert [m.seq for m in await new.read(name, 1, 5, 10)] == [2, 3, 4]
        assert [m.seq for m in await new.read(name, 2, 100, 2)] == [3, 4]
        assert (await new.last(name)).seq == 5
    finally:
        await old.close()
        await new.close()


async def test_the_stream_refuses_a_deposed_owners_append(nats_cluster: NatsCluster):
    """The fence itself, on the real engine: once a new owner has appended
    after reading the channel's tail, the old owner's next append (expecting
    the tail it knew) is refused, and the stream keeps one gap-free order."""
    old = await Engine.connect(nats_cluster.urls, "old-owner")
    new = await Engine.connect(nats_cluster.urls[1:], "new-owner")
    name = "dm:x:y"

    def frame(seq: int, who: str) -> bytes:
        return encode_message(name, seq, 1, who, who.encode())
    try:
        at = await old.append(name, 1, frame(1, "old"), 0, epoch=1)
        tail = await new.last(name)
        assert tail is not None and tail.seq == 1
        await new.append(name, 2, frame(2, "new"), tail.stream_seq, epoch=2)
        # The same seq from the old epoch: refused, not taken for a duplicate.
        with pytest.raises(Fenced):
            await old.append(name, 2, frame(2, "old"), at, epoch=1)
        stored = await new.read(name, 0, 100, 10)
        assert [(m.seq, decode_frame_message(m.frame).sender) for m in stored] == [
            (1, "old"), (2, "new")]
    finally:
        await old.close()
        await new.close()


@pytest.fixture
async def owner(nats_cluster: NatsCluster):
    """An engine connection appending as a channel's owner would."""
    engine = await Engine.connect(nats_cluster.urls, "owner")
    yield engine
    await engine.close()


async def test_an_append_whose_id_names_another_message_is_refused(owner: Engine):
    """JetStream answers a known Nats-Msg-Id as a duplicate: an owner whose
    view of a channel's seqs went back while its expected stream sequence
    stayed right, giving seq 2 of its epoch to a second message, must not take
    that answer for an ack of the second one (it would be acked and never
    stored).  The same message again is still answered as its duplicate."""
    name = "dm:p:q"
    at = await owner.append(name, 1, encode_message(name, 1, 1, "p", b"one"), 0, epoch=1)
    first = encode_message(name, 2, 2, "p", b"two")
    stored = await owner.append(name, 2, first, at, epoch=1)
    # The expected sequence is right (the stream's last), the id is known.
    assert await owner.append(name, 2, first, stored, epoch=1) == stored  # its duplicate
    with pytest.raises(Fenced, match="already names another message"):
        await owner.append(name, 2, encode_message(name, 2, 3, "p", b"other"), stored, epoch=1)
    assert [m.frame for m in await owner.read(name, 0, 100, 10)][-1] == first


async def test_an_append_retried_after_its_answer_was_lost_is_acked_once(owner: Engine):
    """An append stored whose answer was lost (a nats-server died) is tried
    again expecting the sequence before it, which is no longer the last:
    JetStream refuses it ("wrong last sequence") before it looks at the id.
    The stream's last message is that very frame, so it is acked with its
    sequence, stored once, and the owner is not taken for deposed."""
    name = "dm:r:s"
    at = await owner.append(name, 1, encode_message(name, 1, 1, "r", b"one"), 0, epoch=1)
    frame = encode_message(name, 2, 2, "r", b"two")
    stored = await owner.append(name, 2, frame, at, epoch=1)
    assert await owner.append(name, 2, frame, at, epoch=1) == stored
    with pytest.raises(Fenced, match="wrong last sequence"):           # another message
        await owner.append(name, 2, encode_message(name, 2, 3, "r", b"x"), at, epoch=1)
    assert [m.seq for m in await owner.read(name, 0, 100, 10)] == [1, 2]


async def test_two_nodes_first_writes_of_the_same_bytes_are_two_messages(
        nats_cluster: NatsCluster):
    """Two nodes write a new channel's first message at once, epoch 1, seq 1,
    expecting none ("The first message as one quorum write"), and the frames
    happen to be the same bytes (one user, one text, one microsecond, on two
    nodes).  The message id names the node, so the second is not answered as
    the first's duplicate: it is refused (and sent to the owner as a publish of
    its own), not acked as stored.  A retry by the node that stored it, with
    its own id, is still its duplicate, in either of JetStream's two answers:
    the id known (expecting none), or the expected sequence no longer the last."""
    one = await Engine.connect(nats_cluster.urls, "node-one")
    two = await Engine.connect(nats_cluster.urls[1:], "node-two")
    one.node, two.node = 1, 2
    name = "dm:same:bytes"
    first, second = (encode_message(name, seq, 7, "same", b"same") for seq in (1, 2))
    try:
        at = await one.append(name, 1, first, 0, epoch=1)
        assert await one.append(name, 1, first, 0, epoch=1) == at
        with pytest.raises(Fenced):
            await two.append(name, 1, first, 0, epoch=1)
        then = await one.append(name, 2, second, at, epoch=1)
        assert await one.append(name, 2, second, at, epoch=1) == then
        with pytest.raises(Fenced):
            await two.append(name, 2, second, at, epoch=1)
        assert [m.seq for m in await one.read(name, 0, 100, 10)] == [1, 2]
    finally:
        await one.close()
        await two.close()


async def test_a_replica_node_found_dead_and_back_gets_its_channels_live_again(nodes):
    """The owner's node misses a replica node's heartbeats past the lease (here
    SIGSTOP; under a nats-server's death, their reconnects) and forgets what it
    asked for; the replica, resumed, need not have found the owner dead. The
    owner has it ask again, so its receiver gets the next messages live
    (`bench cluster --parts failover`: 800 of 800 missed on two replicas)."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    bob = await n1.connect("bob")
    await alice.create_group("pair", ["bob"])               # n0 sequences group:pair
    group = "group:pair"
    await alice.publish(group, "before")
    await messages_of(bob, group, 2)
    n1.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(float(LEASE) * 2.5)             # n0: "node lost"
    finally:
        n1.signal(signal.SIGCONT)
    await asyncio.sleep(float(LEASE) * 2)                   # n0: "node seen" again
    for i in range(3):
        await alice.publish(group, f"after-{i}")
    got = await messages_of(bob, group, 3, timeout=10)
    assert [m.payload for m in got] == [b"after-0", b"after-1", b"after-2"]


async def test_a_replica_back_with_a_hole_gets_every_message_live_when_its_owner_answers(nodes):
    """A replica node found dead and back (SIGSTOP past the lease) asks its owner
    again; the owner, with a ring of 2, sends only the last two of what was
    published meanwhile, so the replica has a hole, read from the stream, and
    the owner's "warm" (its head) arrives while that read is in flight.  The
    warm must not move the replica's seq to the head over the hole: before,
    the receiver on the replica's node missed every message of the pause live
    (the hole and the two the owner sent)."""
    n0, n1 = nodes("n0", "n1", flags=("--ring-size", "2"))
    alice = await n0.connect("alice")
    group = "group:hole"
    receiver = LiveSeqs(await authed_raw(n1, "bob"), group)
    await alice.create_group("hole", ["bob"])               # n0 sequences group:hole
    await alice.publish(group, "before")
    await receiver.until(2, 15)
    assert receiver.seqs == [1, 2]
    n1.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(float(LEASE) * 2.5)             # n0: "node lost"
        # Not sent to n1 (n0 forgot its interest): past n0's ring of 2.
        head = max([(await alice.publish(group, f"away-{i}")).seq for i in range(6)])
    finally:
        n1.signal(signal.SIGCONT)
    await receiver.until(head, 15)                          # n0 has n1 ask again
    after = (await alice.publish(group, "after")).seq
    await receiver.until(after, 15)
    assert receiver.seqs == list(range(1, after + 1)), (
        f"missing live: {sorted(set(range(1, after + 1)) - set(receiver.seqs))}")


async def test_a_paused_owner_steps_down_and_nothing_conflicts(nodes):
    """SIGSTOP of the owner past its lease: another node takes the channel
    over; resumed, the old owner steps down (its watch of the claims, or the
    stream refusing its append) and its client's publishes go to the new
    owner: one gap-free order, no seq twice."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    bob = await n1.connect("bob")
    await alice.create_group("pair", ["bob"])               # n0 sequences group:pair
    group = "group:pair"
    acks = [await alice.publish(group, "before")]
    # n1 knows the group (and holds its replica) once both messages reach bob:
    # before that, his publish is refused NOT_FOUND (DESIGN, limits).
    await messages_of(bob, group, 2)
    n0.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        acks.append(await publish_surely(bob, group, "while-stopped", "b-1", deadline))
    finally:
        n0.signal(signal.SIGCONT)
    for i in range(5):
        acks.append(await publish_surely(alice, group, f"after-{i}", f"a-{i}",
                                         time.monotonic() + 30))
    seqs = [a.seq for a in acks]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    page = await bob.history(group, limit=100)
    assert [m.seq for m in page] == list(range(1, len(page) + 1))
    assert [m.payload for m in page][-7:] == [b"before", b"while-stopped",
                                             *(f"after-{i}".encode() for i in range(5))]
    assert '"stepped down"' in n0.log() or "stepped down" in n0.log()


async def test_an_owner_deposed_while_stored_messages_wait_in_its_release_order_delivers_each_once(
        nodes, nats_cluster: NatsCluster):
    """A node hands its records back in one order over all its channels
    (ClusterStore._release): a message JetStream has stored waits there behind
    an earlier record, here another group's change whose KV write the groups'
    bucket holds (its stream replaced by a subscriber that answers nothing).
    The owner is then deposed (SIGSTOP past its lease; another node takes the
    channel over from the stream, where that message is) and, resumed, steps
    down with the message still waiting.  Released once the bucket answers,
    the message is acked to its publisher at the seq the stream gave it, and
    the receiver on the old owner's node gets every seq once, in order: it
    becomes a replica from that message on.  Before, the step-down set the
    channel's seq below it, the new owner sent it again, and its release
    pushed a seq the ring already had (ValueError in the hub's release): the
    publisher never got its ACK, nor anything released behind it."""
    n0, n1 = nodes("n0", "n1")
    alice, dave = await n0.connect("alice"), await n0.connect("dave")
    bob = await n1.connect("bob")
    group = "group:busy"
    receiver = LiveSeqs(await authed_raw(n0, "carol"), group)
    await alice.create_group("busy", ["bob", "carol"])      # n0 sequences group:busy
    await messages_of(bob, group, 1)                        # n1 knows the group
    await receiver.until(1, 15)
    nc = await nats.connect(nats_cluster.urls)
    reader = await Engine.connect(nats_cluster.urls, "reader")
    try:
        held = await hold_bucket(nc, "fenghuo_groups")

        async def holding() -> bool:
            return bool(held)
        change = asyncio.ensure_future(dave.create_group("other", ["alice"]))
        await until(holding)                                # in n0's order, unanswered
        publish = asyncio.ensure_future(alice.publish(group, "stored"))

        async def stored() -> bool:
            last = await reader.last(group)
            return last is not None and last.seq == 2
        await until(stored)                                 # in the stream, held here
        await asyncio.sleep(0.3)                            # JetStream's answer reaches n0
        assert not publish.done()
        n0.signal(signal.SIGSTOP)
        try:
            taken = await publish_surely(bob, group, "while-stopped", "b-1",
                                         time.monotonic() + 30)
        finally:
            n0.signal(signal.SIGCONT)
        assert taken.seq == 3                               # n1 read seq 2 from the stream

        async def stepped_down() -> bool:
            return '"stepped down"' in n0.log()
        await until(stepped_down, 15)
        await asyncio.sleep(1.0)                            # n1 answers n0's interest
        await nc.close()                                    # the bucket answers again
        nc = await nats.connect(nats_cluster.urls)
        await nc.jetstream().create_key_value(bucket="fenghuo_groups", history=1, replicas=3)
        ack = await asyncio.wait_for(publish, 40.0)
        assert ack.seq == 2
        with contextlib.suppress(FenghuoError):             # its write may have given up
            await asyncio.wait_for(change, 40.0)
        after = await publish_surely(bob, group, "after", "b-2", time.monotonic() + 30)
        assert after.seq == 4
        await receiver.until(4, 15)
        assert receiver.seqs == [1, 2, 3, 4]
        assert "ring expects seq" not in n0.log()
    finally:
        await nc.close()
        await reader.close()


def test_cluster_options_from_flag_env_and_toml(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('[server]\ncluster = "nats://10.0.0.1:4222,nats://10.0.0.2:4222"\n'
                    'region = "eu"\n')
    settings = load({"node": "fra-1"}, env={"FENGHUO_CLUSTER_LEASE": "2.5"},
                    config_file=str(toml))
    assert settings.cluster_urls == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    assert (settings.node_name, settings.region, settings.cluster_lease) == ("fra-1", "eu", 2.5)
    assert load({}, env={}).cluster == ""            # without --cluster: a single node


@pytest.mark.parametrize("flags, error", [
    (("--node", "a.b"), "--node may hold only letters, digits, '-' and '_'"),
    (("--store", "memory"), "--cluster needs --store sqlite"),
])
def test_cluster_combinations_not_built_are_refused(tmp_path, flags, error):
    done = subprocess.run([sys.executable, "-m", "fenghuo", "serve", "--cluster",
                           "nats://127.0.0.1:4222", "--data-dir", str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert error in done.stderr


def test_a_cluster_url_must_be_nats():
    with pytest.raises(ValueError, match="--cluster takes nats://host:port URLs"):
        load({"cluster": "http://x:1"}, env={})


async def test_healthz_tells_the_node_s_cluster_state(nodes):
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    await alice.send("bob", "hi")                   # n0 claims dm:alice:bob
    with urllib.request.urlopen(f"http://127.0.0.1:{n0.metrics_port}/healthz", timeout=5) as r:
        state = json.load(r)["cluster"]
    assert (state["node"], state["region"], state["engine_connected"]) == ("n0", "default", True)
    assert state["channels_owned"] == 1 and state["appended"] == 1
    assert "n1" in state["peers"]


def healthz(port: int) -> tuple[int, dict]:
    """The status and JSON of ``/healthz`` on ``port``, a 503 included; (0, {}) while
    nothing listens there (the metrics server starts just after the relay's port)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except urllib.error.URLError:
        return 0, {}


async def answers(port: int, code: int, timeout: float = 30.0) -> dict:
    """``/healthz`` on ``port`` once it answers ``code``: its JSON."""
    async def check() -> dict | None:
        got, body = healthz(port)
        return body if got == code else None
    return await until(check, timeout)


async def test_healthz_is_503_degraded_while_the_node_s_engine_is_away(nodes,
                                                                      nats_cluster: NatsCluster):
    """kill -9 of every nats-server: the node can take no publish of a channel, no
    claim and no group change, so its /healthz answers 503 "degraded" (engine
    not connected) for a load balancer to send new clients to another node;
    200 "ok" again once it has reconnected.  Before, it answered 200 "ok"."""
    (n0,) = nodes("n0")
    assert (await answers(n0.metrics_port, 200))["status"] == "ok"
    for server in nats_cluster.servers:
        server.kill()
    body = await answers(n0.metrics_port, 503)
    assert (body["status"], body["cluster"]["engine_connected"]) == ("degraded", False)
    nats_cluster.restart()
    body = await answers(n0.metrics_port, 200)
    assert (body["status"], body["cluster"]["engine_connected"]) == ("ok", True)


async def test_presence_across_nodes_and_a_dead_node_s_users_go_offline(nodes):
    n0, n1 = nodes("n0", "n1")
    ops = await n0.connect("ops", presence=True)
    await n1.connect("bob", reconnect=False)
    deadline = time.monotonic() + 10
    while not (await ops.presence(["bob"]))["bob"]["online"]:
        assert time.monotonic() < deadline, "bob on n1 never seen online from n0"
        await asyncio.sleep(0.1)
    n1.kill()
    killed = time.monotonic()
    while (await ops.presence(["bob"]))["bob"]["online"]:
        # The lease (1.5 s) and a heartbeat period, with room for a busy machine.
        assert time.monotonic() - killed < 15, "bob still online 15 s after his node died"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("drain", ["1", "7"])
async def test_a_node_cut_off_from_nats_stops_within_its_drain_timeout_and_loses_nothing(
        nodes, nats_cluster: NatsCluster, drain: str):
    """SIGTERM to a node whose only link to NATS has gone silent (a proxy that
    passes nothing and keeps the connection open, so its NATS client notices
    nothing): the node still shuts down gracefully within its drain timeout (1 s,
    and 7 s: past nats-py's 5 s for a consumer's deletion) and exits 0.  Its
    clients get GOAWAY and the close (PROTOCOL §3.20).  What it could not do on
    NATS (stop its watches, say it leaves) is left to the lease, and its log
    names each of those steps: its users go offline on the other node and its
    channel is sequenced again there, every message it acked still stored.
    Before, its stop waited out each NATS step's own timeout (a consumer's
    deletion, the connection's drain and flush: 30 s and more); and its log
    counted the "leaving" heartbeat, only buffered, as sent, and with 7 s a
    consumer deletion that timed out as done."""
    first = nats_cluster.servers[0]
    proxy = NatsProxy((first.host, first.port))
    try:
        (n0,) = nodes("n0")
        url = await proxy.start()
        (n1,) = await asyncio.to_thread(nodes, "n1", urls=[url],      # the loop runs the proxy
                                        flags=("--drain-timeout", drain))
        ops = await n0.connect("ops", presence=True)
        bob = await n0.connect("bob")
        alice = await n1.connect("alice", reconnect=False)
        await alice.create_group("crew", ["bob"])           # n1 sequences group:crew
        group = "group:crew"
        acked = [(await alice.publish(group, f"before-{i}")).seq for i in range(3)]
        await until(lambda: _online(ops, "alice"))
        watcher = await authed_raw(n1, "carol")
        proxy.cut()
        n1.signal(signal.SIGTERM)
        stopped = time.monotonic()
        # Far above the drain timeout and below the NATS timeouts it waited out.
        code = await asyncio.to_thread(n1.proc.wait, 60)
        took = time.monotonic() - stopped
        assert (code, took < float(drain) + 11) == (0, True), \
            f"exit {code} {took:.1f} s after SIGTERM"
        goaway = await watcher.expect_json(FrameType.GOAWAY)
        assert goaway == {"reason": "shutdown", "reconnect_after_ms": 1000}
        await watcher.expect_closed()
        # Left to the lease (1.5 s): alice offline, and n0 sequences the group after n1.
        await until(lambda: _offline(ops, "alice"), timeout=15)
        after = await publish_surely(bob, group, "after", "after", time.monotonic() + 20)
        stored = await stored_messages(bob, group)
        assert [s for s, _ in stored] == list(range(1, after.seq + 1))
        payloads = dict(stored)
        assert [payloads[s] for s in acked] == ["before-0", "before-1", "before-2"]
        lines = [json.loads(line) for line in n1.log().splitlines() if line.startswith("{")]
        stopping = next(i for i, line in enumerate(lines) if line["msg"] == "shutting down")
        # What it gave up, said once, every step of it; nothing else went wrong
        # (cut off for longer than the lease, it finds its peer lost: so it is).
        left = "NATS did not answer the node's stop in time: left to the lease"
        warned = [line for line in lines[stopping:]
                  if line["level"] in ("warning", "error", "critical")]
        assert {line["msg"] for line in warned} <= {left, "node lost"}, warned
        (gave_up,) = [line for line in warned if line["msg"] == left]
        assert gave_up["undone"] == ["the watches' consumers deleted", "peers told it leaves",
                                     "node records sent", "the connection drained"]
    finally:
        await proxy.close()


async def _offline(client: fenghuo.Client, user: str) -> bool:
    return not await _online(client, user)


class LiveSeqs:
    """The seqs a bare connection receives, per channel (:attr:`by_channel`), as
    they arrive (no client library between: nothing resumed, reordered or
    deduplicated); :attr:`seqs` are ``channel``'s."""

    def __init__(self, conn, channel: str = "") -> None:
        self.conn, self.channel = conn, channel
        self.by_channel: dict[str, list[int]] = {}
        self.seqs: list[int] = self.by_channel.setdefault(channel, [])

    async def until(self, head: int, timeout: float) -> None:
        """Read until seq ``head`` of ``channel`` arrives, or ``timeout`` (the caller
        checks what came)."""
        await self.until_all([self.channel], head, timeout)

    async def until_all(self, channels: list[str], head: int, timeout: float) -> None:
        """Read until seq ``head`` of each of ``channels`` arrives, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while (any(self.by_channel.get(c, [0])[-1:] < [head] for c in channels)
               and time.monotonic() < deadline):
            try:
                frame = await self.conn.frame(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                return
            assert frame is not None, "the receiver's connection was closed"
            if frame.type == FrameType.MESSAGE:
                message = decode_message(frame.body)
                self.by_channel.setdefault(message.channel, []).append(message.seq)


async def a_follower(nats_cluster: NatsCluster) -> NatsServer:
    """A nats-server that does not lead the stream (made here if there is none yet)."""
    await (await Engine.connect(nats_cluster.urls, "test-setup")).close()   # makes the stream
    leader = await stream_leader(nats_cluster.urls)
    return next(s for s in nats_cluster.servers if s.name != leader)


async def test_a_nats_server_killed_under_load_loses_nothing_and_the_receiver_gets_each_live(
        nodes, nats_cluster: NatsCluster):
    """kill -9 of a nats-server while publishers on two nodes write one channel:
    every acked message is stored once, in one gap-free order, and a receiver
    on a third node gets each once, in order, on the connection it had (no
    reconnect): what core NATS lost on the way to its node is read from the
    stream (DESIGN, Cluster, failure modes).

    The receiver's node reaches NATS only through the server killed, and that
    server does not lead the stream, so appends go on while the node
    reconnects: records the owner sends it meanwhile have nobody to go to and
    are dropped (a hole in the replica in 7 of 8 runs; without the fill, 3 of
    3 runs missed messages live)."""
    victim = await a_follower(nats_cluster)
    others = [s for s in nats_cluster.servers if s is not victim]
    n0, n1 = nodes("n0", "n1", servers=others)
    (n2,) = nodes("n2", servers=[victim])
    alice, bob = await n0.connect("alice"), await n1.connect("bob")
    group = "group:load"
    carol = LiveSeqs(await authed_raw(n2, "carol"), group)
    await alice.create_group("load", ["bob", "carol"])     # n0 sequences it
    received = carol.seqs
    await carol.until(1, 15)                               # the group's created event
    assert received == [1]
    acked: dict[str, int] = {}
    stop = asyncio.Event()

    async def publisher(client: fenghuo.Client, lane: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"{client.user}-{lane}-{i}"
            acked[key] = (await publish_surely(client, group, key, key,
                                               time.monotonic() + 30)).seq
            i += 1

    # Three publishes in flight per publisher: the channel's appends follow
    # each other closely, so records are on their way whenever the server dies.
    tasks = [asyncio.create_task(publisher(c, lane)) for c in (alice, bob) for lane in range(3)]
    while len(acked) < 50:                                 # under load
        await asyncio.sleep(0.05)
    victim.kill()
    killed = len(acked)
    deadline = time.monotonic() + 30
    while len(acked) < killed + 100 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(acked) >= killed + 100, "publishing did not go on after the server died"
    head = max(acked.values())
    stored: list[tuple[int, str]] = []
    # Read on the owner's node: a replica's history may lag it by a hop (DESIGN).
    while page := await alice.history(group, after=stored[-1][0] if stored else 0, limit=100):
        stored += [(m.seq, m.payload.decode()) for m in page]
    assert [s for s, _ in stored] == list(range(1, len(stored) + 1))
    by_key = {p: s for s, p in stored}
    assert len(by_key) == len(stored), "a message was stored twice"
    wrong = {k: (s, by_key.get(k)) for k, s in acked.items() if by_key.get(k) != s}
    assert not wrong, f"acked seqs not stored under them: {wrong}"
    await carol.until(head, 30)
    missing = sorted(set(range(1, head + 1)) - set(received))
    assert received == list(range(1, head + 1)), f"missing live: {missing[:20]}"
    assert not carol.conn.is_closed


@contextlib.asynccontextmanager
async def last_messages_held(nodes, nats_cluster: NatsCluster, name: str,
                             replica: NatsProxy | None = None
                             ) -> AsyncIterator[tuple[NatsServer, WritesHeld, RelayProcess,
                                                      LiveSeqs, int]]:
    """n0, behind a proxy to a follower of the stream, sequences group ``name``;
    carol on n1 (on the other servers; through ``replica``, a proxy pointed here
    at one of them, if given) has its first seq live; n0's
    records of its next three messages to other nodes are held back, never
    forwarded.  Yields the server behind the proxy, the proxy (still holding),
    n1, carol and the head."""
    # Not the stream's leader: the appends and the replica's reads go on at once.
    server = await a_follower(nats_cluster)
    records = WritesHeld((server.host, server.port), "fh.node.")   # n0's records to other nodes
    url = await records.start()
    others = [s for s in nats_cluster.servers if s is not server]
    try:
        (n0,) = await asyncio.to_thread(nodes, "n0", urls=[url])     # the loop runs the proxy
        if replica is None:
            (n1,) = await asyncio.to_thread(nodes, "n1", servers=others)
        else:
            replica.target = (others[0].host, others[0].port)
            (n1,) = await asyncio.to_thread(nodes, "n1", urls=[await replica.start()])
        alice = await n0.connect("alice")
        group = f"group:{name}"
        carol = LiveSeqs(await authed_raw(n1, "carol"), group)
        await alice.create_group(name, ["carol"])               # n0 sequences it
        await carol.until(1, 15)                                # the group's created event
        assert carol.seqs == [1]
        records.holding = True
        head = max([(await alice.publish(group, f"last-{i}")).seq for i in range(3)])
        assert head == 4

        async def last_held() -> bool:
            return any(b"last-2" in frame for frame in records.held)

        await until(last_held)               # n0 sends the records after the acks
        yield server, records, n1, carol, head
    finally:
        await records.close()
        if replica is not None:
            await replica.close()


async def test_an_owner_s_last_messages_lost_with_its_nats_server_reach_the_replica_live(
        nodes, nats_cluster: NatsCluster):
    """The owner's only nats-server dies with the records of the channel's last
    messages to a replica node lost on the way (held back here, never
    forwarded), and nothing is published after them: the owner, reconnected
    to another server, has that node ask again, so its receiver gets each of
    them live, on the connection it had.  Before, it got them only with the
    channel's next message, here never (HISTORY had them)."""
    async with last_messages_held(nodes, nats_cluster, "tail") as (victim, records, _, carol,
                                                                           head):
        victim.kill()                          # n0 reconnects to another server; no more publishes
        # Not listening any more: n0 reconnects to a live server, not through
        # here; its connection here ends as the dead server's side closes.
        records.server.close()
        await carol.until(head, 15)
        assert carol.seqs == list(range(1, head + 1)), f"live: {carol.seqs}"
        assert not carol.conn.is_closed


async def test_an_owner_s_last_messages_lost_between_servers_that_stay_up_reach_the_replica_live(
        nodes, nats_cluster: NatsCluster):
    """The records of a channel's last messages from its owner node to a
    replica node are lost (held back here and dropped, never forwarded) while
    every nats-server stays up and no client reconnects (a route cut and
    healed), and nothing is published after them: the owner's next heads list
    shows the replica behind, which asks again, so its receiver gets each of
    them live, once, in order, on the connection it had.  Before, it got them
    only with the channel's next message, here never (HISTORY had them)."""
    async with last_messages_held(nodes, nats_cluster, "dropped") as (_, records, n1, carol,
                                                                      head):
        records.holding = False                 # what it held is dropped; every server stays up
        await carol.until(head, 15)
        assert carol.seqs == list(range(1, head + 1)), f"live: {carol.seqs}"
        assert not carol.conn.is_closed
        state = healthz(n1.metrics_port)[1]["cluster"]
        assert state["heads_behind"] >= 1, state


async def test_an_owner_s_last_messages_lost_for_longer_than_their_lists_reach_the_replica_live(
        nodes, nats_cluster: NatsCluster):
    """As above, but every record n0 sends other nodes is lost for longer than
    a channel stays in its heads lists (its four next lists held back and
    dropped with the messages): the first list after the loss is numbered
    past the last n1 saw, so n1 asks again for the replicas n0 feeds it, and
    its receiver gets each message live, once, in order, on the connection it
    had.  Before the lists were numbered, n0 listed the group no more once it
    had been idle for three lists, and the receiver never got them live."""
    async with last_messages_held(nodes, nats_cluster, "long") as (_, records, n1, carol, head):
        heads, group = b'"op":"heads"', b'"group:long"'

        async def its_lists_held() -> bool:
            return sum(heads in frame and group in frame for frame in records.held) >= HEADS_REPEAT
        await until(its_lists_held, 20)
        # and a list more, which no longer names the group: the loss outlasts them
        await asyncio.sleep(1.5 * HEADS_INTERVAL)
        records.holding = False                 # all of it dropped; every server stays up
        await carol.until(head, 15)
        assert carol.seqs == list(range(1, head + 1)), f"live: {carol.seqs}"
        assert not carol.conn.is_closed
        state = healthz(n1.metrics_port)[1]["cluster"]
        assert state["heads_missed"] >= 1, state


class AskDropped(NatsProxy):
    """A TCP proxy to a nats-server that drops the next ``dropping`` records its
    client (a replica node) publishes asking an owner for ``channel`` (an
    ``interest``); everything else passes both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.channel = b""
        self.dropping = 0
        self.dropped = 0

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            if (self.dropping and words[:1] in ([b"PUB"], [b"HPUB"])
                    and b'"op":"interest"' in frame and self.channel in frame):
                self.dropping -= 1
                self.dropped += 1
                continue                                 # lost by core NATS
            writer.write(frame)
        writer.close()


async def test_an_ask_again_lost_on_its_way_to_the_owner_is_asked_again(
        nodes, nats_cluster: NatsCluster):
    """As above (n0's records lost for longer than the group stays in its
    heads lists), and n1's ask again for the group is lost too, while every
    server stays up: n1 asks again once n0's next heads records show its ask
    unanswered, so carol gets each message live, once, in order.  Before, an
    ask that core NATS lost was never asked again: n0 no longer lists the
    idle group, its numbers run on unbroken, and carol never got them live."""
    asks = AskDropped(("", 0))                  # pointed at a server of n1's
    async with last_messages_held(nodes, nats_cluster, "lost", asks) as (
            _, records, n1, carol, head):
        heads, group = b'"op":"heads"', b'"group:lost"'

        async def its_lists_held() -> bool:
            return sum(heads in frame and group in frame for frame in records.held) >= HEADS_REPEAT
        await until(its_lists_held, 20)
        await asyncio.sleep(1.5 * HEADS_INTERVAL)
        asks.channel, asks.dropping = group, 1
        records.holding = False                 # all of it dropped; every server stays up

        async def ask_dropped() -> bool:
            return asks.dropped == 1
        await until(ask_dropped, 15)
        await carol.until(head, 20)
        assert carol.seqs == list(range(1, head + 1)), f"live: {carol.seqs}"
        assert not carol.conn.is_closed
        state = healthz(n1.metrics_port)[1]["cluster"]
        assert state["asks_repeated"] >= 1, state


async def stream_leader(urls: list[str]) -> str:
    """The nats-server leading the stream (every append goes through it)."""
    nc = await nats.connect(urls)
    try:
        info = await nc.jetstream().stream_info(STREAM)
    finally:
        await nc.close()
    assert info.cluster is not None and info.cluster.leader
    return info.cluster.leader


async def test_the_stream_leader_s_nats_server_killed_under_load_every_node_gets_each_live(
        nodes, nats_cluster: NatsCluster):
    """kill -9 of the nats-server that LEADS the stream while publishers on the two
    replica nodes write a channel sequenced by a third: appends wait for the
    new leader (nats-server 2.9 elects it 4-9 s later), every acked message is
    stored once in one gap-free order, a receiver on every node gets each once,
    in order, and HISTORY on a replica node serves them all.

    Before the owner's append waited out the election, it gave up after about
    3 s of "no responders", stepped down and took the channel again; the
    replica nodes were never asked again, and their receivers got nothing
    after the kill (`bench cluster --parts failover`: 798 of 800 missed)."""
    n0, n1, n2 = nodes("n0", "n1", "n2")
    alice, bob, carol = (await n0.connect("alice"), await n1.connect("bob"),
                         await n2.connect("carol"))
    group = "group:lead"
    receivers = [LiveSeqs(await authed_raw(n, f"r{k}"), group) for k, n in enumerate((n0, n1, n2))]
    await alice.create_group("lead", ["bob", "carol", "r0", "r1", "r2"])   # n0 sequences it
    for r in receivers:
        await r.until(1, 15)
        assert r.seqs == [1], f"{r.seqs} before any publish"
    acked: dict[str, int] = {}
    stop = asyncio.Event()

    tasks = publishing(group, (bob, carol), acked, stop, patience=40)
    try:
        while len(acked) < 30:                             # under load
            await asyncio.sleep(0.05)
        leader = await stream_leader(nats_cluster.urls)
        next(s for s in nats_cluster.servers if s.name == leader).kill()
        killed = len(acked)
        deadline = time.monotonic() + 40
        while len(acked) < killed + 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert len(acked) >= killed + 60, "publishing did not go on after the leader died"
    head = max(acked.values())
    stored: list[tuple[int, str]] = []
    while page := await alice.history(group, after=stored[-1][0] if stored else 0, limit=100):
        stored += [(m.seq, m.payload.decode()) for m in page]
    assert [s for s, _ in stored] == list(range(1, head + 1))
    by_key = {p: s for s, p in stored}
    assert len(by_key) == len(stored), "a message was stored twice"
    wrong = {k: (s, by_key.get(k)) for k, s in acked.items() if by_key.get(k) != s}
    assert not wrong, f"acked seqs not stored under them: {wrong}"
    for k, r in enumerate(receivers):
        await r.until(head, 30)
        missing = sorted(set(range(1, head + 1)) - set(r.seqs))
        assert r.seqs == list(range(1, head + 1)), f"node n{k}: missing live {missing[:20]}"
    on_replica: list[tuple[int, str]] = []
    while page := await bob.history(group, after=on_replica[-1][0] if on_replica else 0,
                                    limit=100):
        on_replica += [(m.seq, m.payload.decode()) for m in page]
    assert on_replica == stored, "HISTORY on a replica node differs from the stream"


async def test_a_re_send_waiting_on_an_append_that_fails_is_refused_with_it_not_acked(
        nodes, nats_cluster: NatsCluster):
    """A publish re-sent (same key) while its original's append waits on
    JetStream is answered as the original is: when the append fails, both get
    ERROR INTERNAL "retry", and no ACK names a seq the stream gave another
    message.  (The re-send's ACK DUPLICATE used to go out anyway: CI on
    a46b6e6 acked ``bob-24`` with seq 52 after a stream leader's kill, and seq
    52 held another publisher's message.)  Every nats-server is stopped so
    that the append fails; the node's lease runs out meanwhile."""
    (n0,) = nodes("n0")
    alice = await authed_raw(n0, "alice")
    chat = "dm:alice:bob"

    def publish(key: bytes, request_id: int) -> bytes:
        return encode_publish(chat, key, key=key, request_id=request_id)

    async def publish_surely(key: bytes, request_id: int) -> int:
        """Until acked (the node takes the channel again once NATS is back)."""
        deadline = time.monotonic() + 60
        while True:
            alice.write(publish(key, request_id))
            frame = await alice.reply(30)
            assert frame is not None and frame.request_id == request_id, describe(frame)
            if frame.type == FrameType.ACK:
                return decode_ack(frame.body).seq
            code, text = decode_error(frame.body)
            assert code in RETRYABLE and time.monotonic() < deadline, text
            await asyncio.sleep(0.2)

    assert await publish_surely(b"k1", 2) == 1
    for server in nats_cluster.servers:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
    try:
        alice.write(publish(b"k2", 3) + publish(b"k2", 4))   # the original, its re-send
        first, again = await alice.replies(2, timeout=60)
    finally:
        for server in nats_cluster.servers:
            assert server.proc is not None
            server.proc.send_signal(signal.SIGCONT)
    # INTERNAL "retry" when the append fails; REQUEST_TIMEOUT when the node's
    # request_timeout (5 s) runs out first (2 runs in 13 alone): both say
    # "not known to be stored, retry" (PROTOCOL §4), neither is an ACK.
    assert (first.type, first.request_id) == (FrameType.ERROR, 3), describe(first)
    assert decode_error(first.body)[0] in RETRYABLE, describe(first)
    assert again.type == FrameType.ERROR, (
        f"the re-send of a publish that was not stored was answered {describe(again)}")
    assert again.request_id == 4 and decode_error(again.body)[0] in RETRYABLE, describe(again)
    # The failed append may still reach the stream: its publish can sit in a
    # stopped server's socket and be stored once the servers go on (CI on
    # debe771, 1 run in 4 alone; the node says so, cluster_store.py: "the
    # append out, if any, may still be stored"). Then k2 holds seq 2 and its
    # re-send is acked with it; otherwise seq 2 was never given and the next
    # publish takes it. Either way each key is stored once and every ACK
    # names the seq its message is stored at.
    k3 = await publish_surely(b"k3", 5)
    k2 = await publish_surely(b"k2", 6)
    history = await (await n0.connect("alice")).history(chat, after=0, limit=10)
    stored = [(m.seq, m.key) for m in history]
    assert stored in ([(1, b"k1"), (2, b"k3"), (3, b"k2")],
                      [(1, b"k1"), (2, b"k2"), (3, b"k3")]), stored
    assert {key: seq for seq, key in stored} == {b"k1": 1, b"k2": k2, b"k3": k3}


def cluster_status(nats_cluster: NatsCluster, *flags: str,
                   lease: str = LEASE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fenghuo", "cluster", "status", "--cluster",
                           nats_cluster.url_list, "--lease", lease, *flags],
                          capture_output=True, text=True, timeout=60)


async def test_cluster_status_tells_what_each_node_owns_and_whether_it_is_alive(
        nodes, nats_cluster: NatsCluster):
    """``fenghuo cluster status`` reads the claims and the heartbeats from NATS:
    a dead node is shown with what it still holds, until a live one needs it."""
    n0, n1 = nodes("n0", "n1")
    # Nobody on the other node is in these channels: it has no reason to claim them.
    alice = await n0.connect("alice")
    await alice.send("carol", "hi")                        # n0 claims dm:alice:carol
    bob = await n1.connect("bob", reconnect=False)
    await bob.create_group("pair", ["dave"])               # n1 claims group:pair

    async def both_claimed() -> dict[str, dict] | None:
        # Listening for two leases: a node starved by a busy machine is still heard.
        done = await asyncio.to_thread(cluster_status, nats_cluster, "--json", lease="3")
        assert done.returncode == 0, done.stderr
        by_name = {n["name"]: n for n in json.loads(done.stdout)["nodes"]}
        # A first write's claim is made beside its append, so it may reach the
        # bucket after the ACK (a CI run read n0 owning nothing, load 1).
        owners = [by_name.get(name, {}).get("channels") for name in ("n0", "n1")]
        return by_name if all(owners) else None
    by_name = await until(both_claimed, timeout=30)
    assert (by_name["n0"]["alive"], by_name["n0"]["channels"]) == (True, {"dm:alice:carol": 1})
    assert (by_name["n1"]["alive"], by_name["n1"]["channels"]) == (True, {"group:pair": 1})
    assert by_name["n0"]["region"] == "default"
    n1.kill()
    await asyncio.sleep(float(LEASE))                      # its last heartbeat is a lease old
    expected = [["n0", str(by_name["n0"]["index"]), "default", "yes", "1"],
                ["n1", str(by_name["n1"]["index"]), "-", "NO", "1"]]
    last: list[str] = []

    async def n1_seen_dead() -> bool:
        # Read until it shows: a CI run (load 1) once read a table without the
        # expected n0 row; the output it read is in the failure's message.
        done = await asyncio.to_thread(cluster_status, nats_cluster, "--channels")
        assert done.returncode == 0, done.stderr
        last[:] = done.stdout.splitlines()
        return (last[0].endswith(": 2 nodes, 1 alive (heard within 1.5 s)")
                and all(any(line.split()[:5] == row for line in last) for row in expected))
    try:
        await until(n1_seen_dead, timeout=20)
    except AssertionError:
        raise AssertionError("\n".join(last)) from None
    assert "  group:pair  n1  epoch 1" in last, last


def test_cluster_status_without_nats_says_so_in_one_line(tmp_path):
    port = free_port("127.0.0.1")                          # nobody listens there
    done = subprocess.run([sys.executable, "-m", "fenghuo", "cluster", "status", "--cluster",
                           f"nats://127.0.0.1:{port}", "--lease", "0.1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"fenghuo: cannot read the cluster's state from "
                                  f"nats://127.0.0.1:{port}: ")
    assert len(done.stderr.splitlines()) == 1


async def test_metrics_tell_the_node_s_cluster_state(nodes):
    """/metrics of a node: engine, peers, channels owned, appends, forwarded
    publishes, the replica's lag; failovers once a dead node's channel is taken."""
    n0, n1 = nodes("n0", "n1")
    bob = await n1.connect("bob")
    for i in range(3):
        await bob.send("alice", f"m{i}")                   # n1 claims dm:alice:bob
    alice = await n0.connect("alice")
    await alice.send("bob", "back")                        # forwarded from n0 to n1
    # n0's replica of the chat (alice is a member) gets all four.
    await wait_for_metric(n0, "fenghuo_cluster_replica_lag_seconds_count", lambda v: v >= 4, 15)
    on0, on1 = await metrics(n0), await metrics(n1)
    assert on0["fenghuo_cluster_engine_connected"] == on1["fenghuo_cluster_engine_connected"] == 1
    assert on0["fenghuo_cluster_peers_alive"] == 1
    assert (on0["fenghuo_cluster_channels_owned"], on1["fenghuo_cluster_channels_owned"]) == (0, 1)
    assert on1["fenghuo_cluster_appends_total"] == 4
    assert on0["fenghuo_cluster_forwarded_publishes_total"] == 1
    assert on1["fenghuo_cluster_forwarded_publishes_total"] == 0
    assert on0["fenghuo_cluster_replica_lag_seconds_count"] == 4
    assert on0["fenghuo_cluster_appends_refused_total"] == 0
    assert on0["fenghuo_cluster_failovers_total"] == 0
    n1.kill()
    await publish_surely(alice, "dm:alice:bob", "after", "after", time.monotonic() + 30)
    on0 = await metrics(n0)
    assert on0["fenghuo_cluster_failovers_total"] == 1
    assert on0["fenghuo_cluster_channels_owned"] == 1
    assert on0["fenghuo_cluster_peers_alive"] == 0


# ---------------------------------------------------------------- shared state

async def until(check, timeout: float = 10.0, every: float = 0.1):
    """``await check()`` until it returns something true (its value), for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"{check} still false after {timeout} s"
        await asyncio.sleep(every)
    return value


async def test_a_group_made_before_a_node_started_is_known_there_with_its_roles(nodes):
    """Groups live in a KV bucket every node watches: a node started after the
    group was made knows it (members, roles), and a role changed through one
    node is seen on another before the change's event arrives there."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    await alice.create_group("early", ["bob", "carol"], title="made early")
    await alice.publish("group:early", "before n2")
    (n2,) = nodes("n2")
    carol = await n2.connect("carol")
    assert "group:early" in carol.welcome["channels"]
    assert [g["group"] for g in await carol.list_groups()] == ["early"]
    assert await carol.group_members("early") == {"alice": "owner", "bob": "member",
                                                   "carol": "member"}
    ack = await carol.publish("group:early", "from n2")
    page = await carol.history("group:early", limit=10)
    assert [m.payload for m in page][-2:] == [b"before n2", b"from n2"]
    assert page[-1].seq == ack.seq
    # The owner changes a role through another node; the event reaches carol
    # on n2, and n2 knows the change by then.
    owner_on_n1 = await n1.connect("alice")
    await owner_on_n1.set_role("early", "bob", "admin")
    while True:
        message = (await messages_of(carol, "group:early", 1))[0]
        if b'"role"' in message.payload:
            break
    assert (await carol.group_members("early"))["bob"] == "admin"
    # bob, admin now, adds dave from n2: the owner node checks bob's new role.
    bob = await n2.connect("bob")
    assert (await bob.add_members("early", ["dave"]))["added"] == ["dave"]
    (n3,) = nodes("n3")
    dave = await n3.connect("dave")
    assert await dave.group_members("early") == {"alice": "owner", "bob": "admin",
                                                  "carol": "member", "dave": "member"}


async def test_a_device_synced_on_one_node_resumes_on_another(nodes):
    """A device's synced positions are kept in a KV bucket: it syncs on n0,
    comes back with no positions (an app restart) on n1, and resumes there."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    bob = await n0.connect("bob", device="phone")
    for i in range(3):
        await alice.send("bob", f"m{i}")
    assert [m.seq for m in await messages_of(bob, "dm:alice:bob", 3)] == [1, 2, 3]
    assert await bob.sync_cursors_now() == 1
    await bob.close()
    for i in range(3, 5):
        await alice.send("bob", f"m{i}")
    again = await n1.connect("bob", device="phone")          # no epoch: positions null
    assert again.welcome.get("resumed") == {"dm:alice:bob": 3}
    got = await messages_of(again, "dm:alice:bob", 2)
    assert [(m.seq, m.payload) for m in got] == [(4, b"m3"), (5, b"m4")]


async def test_a_device_sync_the_bucket_has_not_answered_holds_no_message(
        nodes, nats_cluster: NatsCluster):
    """A device's cursor sync is written to its KV bucket outside the order of
    the node's messages: while the bucket has not answered it, messages
    sequenced after it on that node (another channel's, another user's) are
    stored, acked and delivered, and the sync's own answer ("saved") still
    waits for the bucket.  Before, each message sequenced after any sync
    waited for its write (`bench cluster --parts regions`: up to 550 ms on
    pairs far from the bucket's leader).  The bucket is made to hold the write
    here: its stream is replaced by a subscriber that answers nothing."""
    (n0,) = nodes("n0")
    alice = await n0.connect("alice")
    bob = await n0.connect("bob", device="phone")
    carol = await n0.connect("carol")
    nc = await nats.connect(nats_cluster.urls)
    try:
        held = await hold_bucket(nc, "fenghuo_devices")

        async def holding() -> bool:
            return bool(held)
        await alice.send("bob", "m0")
        await messages_of(bob, "dm:alice:bob", 1)
        sync = asyncio.ensure_future(bob.sync_cursors_now())
        await until(holding)
        ack = await asyncio.wait_for(carol.send("alice", "while the sync is held"), 4.0)
        assert ack.seq == 1
        got = await messages_of(alice, "dm:alice:carol", 1)
        assert got[0].payload == b"while the sync is held"
        assert not sync.done()                    # "saved" waits for the bucket
        await nc.close()                          # the write is answered again ...
        nc = await nats.connect(nats_cluster.urls)
        await nc.jetstream().create_key_value(bucket="fenghuo_devices", history=1,
                                              replicas=3)
        assert await asyncio.wait_for(sync, 30.0) == 1     # ... once the node tries again
    finally:
        await nc.close()


async def test_read_counts_are_the_same_on_every_node(nodes):
    """Read cursors live in a KV bucket every node watches: unread counts and
    "x of N read" agree on every node, including one started afterwards."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    bob = await n1.connect("bob")
    carol = await n1.connect("carol")
    await alice.create_group("news", ["bob", "carol"])
    acks = [await alice.publish("group:news", f"n{i}") for i in range(3)]
    head = acks[-1].seq
    await messages_of(bob, "group:news", head)
    await bob.mark_read("group:news", head, confirm=True)
    await carol.mark_read("group:news", acks[0].seq, confirm=True)
    expected = {"read": 2, "members": 3}

    async def readers_agree(client):
        got = await client.readers("group:news", acks[0].seq)
        return {k: got[k] for k in expected} == expected
    await until(lambda: readers_agree(alice))
    await until(lambda: readers_agree(carol))
    (n2,) = nodes("n2")
    late_bob, late_carol = await n2.connect("bob"), await n2.connect("carol")
    assert (await late_bob.unread())["group:news"] == 0
    assert (await late_carol.unread())["group:news"] == head - acks[0].seq
    assert (await carol.unread())["group:news"] == head - acks[0].seq
    assert await readers_agree(late_carol)
    at_head = await late_bob.readers("group:news", head)
    assert at_head["read"] == (await alice.readers("group:news", head))["read"]


async def test_a_node_restarted_while_groups_and_reads_are_written_knows_each_one(nodes):
    """A node's start reads the claims', groups' and cursors' buckets side by side
    and learns them in order (NodeCluster.join: a cursor after its group, else it
    is not counted).  n0 is killed and started again while n1 goes on making
    groups and marking their messages read: once the writes stop, carol's
    groups and unread counts on the new n0 are those on n1, the groups and
    cursors made before the restart and those made during it."""
    n0, n1 = nodes("n0", "n1")
    alice, carol = await n1.connect("alice"), await n1.connect("carol")

    async def make(name: str) -> None:
        await alice.create_group(name, ["bob", "carol"])
        first = await alice.publish(f"group:{name}", "one")
        await alice.publish(f"group:{name}", "two")
        await carol.mark_read(f"group:{name}", first.seq, confirm=True)
    for i in range(40):
        await make(f"before{i}")
    n0.kill()
    restarted = asyncio.ensure_future(asyncio.to_thread(nodes, "n0"))
    during = 0
    while not restarted.done() or during < 5:
        await make(f"during{during}")
        during += 1
    (again,) = await restarted
    late_carol = await again.connect("carol")

    async def state(client: fenghuo.Client) -> tuple[list[str], dict[str, int]]:
        groups = sorted(g["group"] for g in await client.list_groups())
        return groups, {c: n for c, n in (await client.unread()).items() if c.startswith("group:")}
    expected = await state(carol)
    assert len(expected[0]) == 40 + during and set(expected[1].values()) == {1}

    async def agrees() -> bool:
        return await state(late_carol) == expected
    await until(agrees, timeout=15)


async def test_group_changes_through_two_owners_lose_none(nodes):
    """The group's owner node is stopped past its lease with a change waiting in
    its socket; another node takes the group over and makes a change of its
    own; resumed, the old owner's change is either refused (INTERNAL, the
    bucket's compare-and-set) or made on top of the other: a change answered
    RESULT is never lost, and every node ends with the same members."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    await alice.create_group("g", ["bob"])                   # n0 sequences group:g
    on_n1 = await n1.connect("alice")
    n0.signal(signal.SIGSTOP)
    try:
        waiting = asyncio.create_task(alice.add_members("g", ["carol"]))
        deadline = time.monotonic() + 30
        while True:
            try:
                await on_n1.add_members("g", ["dave"])
                break
            except FenghuoError as exc:
                if exc.code not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        n0.signal(signal.SIGCONT)
    try:
        carol_added = (await asyncio.wait_for(waiting, 30))["added"] == ["carol"]
    except FenghuoError as exc:
        assert exc.code == ErrorCode.INTERNAL and "retry" in exc.message
        carol_added = False
    expected = {"alice": "owner", "bob": "member", "dave": "member",
                **({"carol": "member"} if carol_added else {})}

    async def members_are(client):
        return await client.group_members("g") == expected
    await until(lambda: members_are(on_n1), timeout=15)
    await until(lambda: members_are(alice), timeout=15)
    (n2,) = nodes("n2")
    assert await (await n2.connect("bob")).group_members("g") == expected


async def test_retention_purges_the_stream_and_seqs_go_on(nodes):
    """--retention deletes old messages from the stream, where a node reads
    history beyond its ring; a channel's last message stays, so a node that
    takes the channel over after its owner died continues its seqs."""
    flags = ("--retention", "dm:=2s,group:keep=forever", "--retention-interval", "0.2",
             "--ring-size", "2")
    n0, n1 = nodes("n0", "n1", flags=flags)
    alice = await n0.connect("alice")
    await alice.create_group("keep", ["bob"])
    for i in range(3):
        await alice.send("bob", f"old-{i}")
        await alice.publish("group:keep", f"kept-{i}")
    await asyncio.sleep(2.5)                       # older than the dm: rule's age
    await alice.send("bob", "new")                 # seq 4
    bob = await n1.connect("bob", reconnect=False)

    async def dm_history() -> list[bytes]:
        return [m.payload for m in await bob.history("dm:alice:bob", after=0, limit=10)]
    await until(lambda: _equals(dm_history, [b"new"]), timeout=15)
    kept = await bob.history("group:keep", after=0, limit=10)
    assert [m.payload for m in kept][-3:] == [b"kept-0", b"kept-1", b"kept-2"]
    # The last message past its age too: the stream keeps it (the rings do
    # not), and a node taking the channel over reads its seq there.
    await asyncio.sleep(2.5)
    n0.kill()                                      # n0 sequenced dm:alice:bob
    ack = await publish_surely(bob, "dm:alice:bob", "after", "after-1", time.monotonic() + 30)
    assert ack.seq == 5


async def _equals(read, expected) -> bool:
    return await read() == expected


# A small max_payload keeps the group that passes it small (1 MiB, the
# default, is about 24,000 members); it still holds a full append batch.
SMALL_PAYLOAD = 128 << 10


def node_state(node: RelayProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/healthz", timeout=5) as r:
        return json.load(r)["cluster"]


@contextlib.asynccontextmanager
async def small_payload_node(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    """One node on nats-servers whose max_payload is SMALL_PAYLOAD; all stopped after."""
    cluster = NatsCluster.start(tmp_path / "nats", max_payload=SMALL_PAYLOAD)
    node = None
    try:
        node = start_node(tmp_path, cluster.urls, "n0")
        yield node
    finally:
        if node is not None:
            await asyncio.gather(*(c.close() for c in node.clients), return_exceptions=True)
            node.stop()
        cluster.stop()


async def still_sequencing(node: RelayProcess, owned: int, sender: fenghuo.Client,
                           receiver: fenghuo.Client, channel: str) -> None:
    """``node`` owns what it did (``owned`` channels), took nothing over, and a
    message of ``channel`` from ``sender`` reaches ``receiver``."""
    state = node_state(node)
    assert (state["channels_owned"], state["failovers"]) == (owned, 0)
    ack = await sender.publish(channel, "still here")
    while (message := (await messages_of(receiver, channel, 1))[0]).seq < ack.seq:
        pass
    assert (message.seq, message.payload) == (ack.seq, b"still here")
    assert node.proc.poll() is None


async def test_a_group_too_large_for_the_engine_is_refused_and_nothing_changes(tmp_path):
    """Members added in batches until the group's record would pass the NATS
    max_payload: that add is refused FRAME_TOO_LARGE before anything changes
    (PROTOCOL §3.16), the node keeps sequencing the group, and messages flow."""
    async with small_payload_node(tmp_path) as node:
        alice = await node.connect("alice")
        await alice.create_group("big", ["bob"])
        bob = await node.connect("bob")
        owned = node_state(node)["channels_owned"]
        with pytest.raises(FenghuoError) as refused:
            for batch in range(20):                    # 20,000 members: far past 128 KiB
                before = await alice.group_members("big")
                await alice.add_members("big", [f"user-{batch}-{i:04d}" for i in range(1000)])
        assert refused.value.code == ErrorCode.FRAME_TOO_LARGE
        assert "too large" in refused.value.message
        assert 1000 < len(before) < 20_000
        assert await alice.group_members("big") == before
        await still_sequencing(node, owned, alice, bob, "group:big")


async def test_a_group_at_the_engine_s_limit_refuses_role_handoff_and_take_and_nothing_changes(
        tmp_path):
    """A group queued for an advisor, then filled with admins until one more would
    pass its record's limit: role changes that lengthen the record (admin ->
    member, a byte each) go on until one would pass it, and that one, a
    handoff to a new member and an advisor's take (ids of 64 characters) are
    each refused FRAME_TOO_LARGE before anything changes (PROTOCOL §3.16);
    the node keeps sequencing the group and messages flow.  Before, only
    create and add were checked: a group at the limit could fail its bucket
    write (INTERNAL, the node stepping down with the change made in its memory)."""
    async with small_payload_node(tmp_path) as node:
        alice = await node.connect("alice")
        await alice.create_group("full", ["bob"])
        await alice.queue_for_advisor("full")
        bob = await node.connect("bob")
        owned = node_state(node)["channels_owned"]
        admins: list[str] = []
        for batch in (1000, 100, 10, 1):
            while True:
                users = [f"a{len(admins) + i:07d}" for i in range(batch)]
                try:
                    await alice.add_members("full", users, role="admin")
                except FenghuoError as exc:
                    assert exc.code == ErrorCode.FRAME_TOO_LARGE, exc
                    break
                admins += users
        assert len(admins) > 1000

        async def refused(call) -> FenghuoError:
            before = await alice.group_members("full")
            with pytest.raises(FenghuoError) as exc:
                await call
            assert await alice.group_members("full") == before, "changed though refused"
            return exc.value

        # Fewer bytes are left than one more admin takes (~35): within that many
        # changes of a byte each, one is refused.
        members = await alice.group_members("full")
        error = None
        for user in admins[:50]:
            try:
                await alice.set_role("full", user, "member")
            except FenghuoError as exc:
                error = exc
                break
            members[user] = "member"
        assert error is not None, "no role change refused"
        assert await alice.group_members("full") == members, "changed though refused"
        assert (error.code, "too large" in error.message) == (ErrorCode.FRAME_TOO_LARGE, True)
        # Out of the queue, the record loses its "queued" (~80 bytes) and gains
        # the one taking it: a member of a 64-character id, ~150 bytes.
        error = await refused(alice.handoff("full", "carol".ljust(64, "x")))
        assert error.code == ErrorCode.FRAME_TOO_LARGE
        li = await node.connect("li".ljust(64, "x"), roles=("advisor",))
        error = await refused(li.take_conversation("full"))
        assert error.code == ErrorCode.FRAME_TOO_LARGE
        await still_sequencing(node, owned, alice, bob, "group:full")
