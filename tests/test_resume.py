"""Reconnect and resume: exactly once, in order, across cut connections.

Connections are cut from the client side with ``transport.abort()`` (a TCP
reset, no goodbye).  Where a test needs the client to stay away for a while,
``hold_reconnect`` makes its reconnect attempts wait on a gate.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import orjson
import pytest

import fenghuo
from fenghuo import ContentType, ErrorCode
from fenghuo.protocol import FrameType
from clients import assert_silent, collect


def hold_reconnect(client: fenghuo.Client) -> asyncio.Event:
    """Make ``client``'s reconnect attempts wait until the returned event is set."""
    gate = asyncio.Event()
    connect_once = client._connect_once

    async def gated() -> None:
        await gate.wait()
        await connect_once()
    client._connect_once = gated   # type: ignore[method-assign]
    return gate


def cut(client: fenghuo.Client) -> None:
    """Reset ``client``'s TCP connection; it notices, as it would a network failure."""
    assert client._proto is not None and client._proto.transport is not None
    client._proto.transport.abort()


async def wait_disconnected(client: fenghuo.Client) -> None:
    for _ in range(500):
        if not client.connected:
            return
        await asyncio.sleep(0.01)
    pytest.fail("client never noticed the cut")


async def test_a_cut_connection_resumes_from_the_ring_exactly_once(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    gate = hold_reconnect(bob)
    for i in range(1, 4):
        await alice.send("bob", f"m{i}")
    assert [m.seq for m in await collect(bob, 3)] == [1, 2, 3]
    epoch = bob.epoch

    cut(bob)
    await wait_disconnected(bob)
    for i in range(4, 11):   # published while bob is away: they wait in the ring
        await alice.send("bob", f"m{i}")
    gate.set()
    await bob.wait_connected(5)
    assert bob.epoch == epoch
    await alice.send("bob", "m11")
    got = await collect(bob, 8)
    assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(4, 12)]
    await assert_silent(bob)
    assert bob.positions == {"dm:alice:bob": 11}


async def test_repeated_cuts_under_a_steady_stream_lose_and_repeat_nothing(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    total = 600
    seen: list[int] = []
    all_seen = asyncio.Event()

    def on_message(message: fenghuo.Message) -> None:
        seen.append(message.seq)
        if len(seen) in (50, 200, 350, 500):
            cut(bob)   # mid-stream, several times
        if len(seen) == total:
            all_seen.set()
    bob.on_message(on_message)

    async def publish_steadily() -> None:
        for i in range(total):
            await alice.send("bob", f"m{i}")
            if i % 25 == 0:
                await asyncio.sleep(0.005)   # let bob's reconnects land mid-stream
    await asyncio.wait_for(publish_steadily(), 30)
    await asyncio.wait_for(all_seen.wait(), 10)
    assert seen == list(range(1, total + 1))
    inbox = await collect(bob, total)
    assert [(m.seq, m.text) for m in inbox] == [(i + 1, f"m{i}") for i in range(total)]
    await assert_silent(bob)


async def test_a_connection_lost_right_after_welcome_is_retried(relay):
    # The catch-up frames arrive in the same read as WELCOME; cutting on the
    # first of them loses the new connection before connect() has resumed.
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    gate = hold_reconnect(bob)
    await alice.send("bob", "m1")
    assert [m.seq for m in await collect(bob, 1)] == [1]
    cut(bob)
    await wait_disconnected(bob)
    for i in range(2, 6):
        await alice.send("bob", f"m{i}")
    first_catch_up = asyncio.Event()

    def cut_on_first_catch_up(message: fenghuo.Message) -> None:
        if message.seq == 2 and not first_catch_up.is_set():
            first_catch_up.set()
            cut(bob)
    bob.on_message(cut_on_first_catch_up)
    gate.set()
    await asyncio.wait_for(first_catch_up.wait(), 5)
    await alice.send("bob", "m6")
    got = await collect(bob, 5)
    assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(2, 7)]
    assert bob.connected


async def test_publishes_made_while_disconnected_are_delivered_once_after_reconnect(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    gate = hold_reconnect(bob)
    cut(bob)
    await wait_disconnected(bob)
    pending = [asyncio.ensure_future(bob.send("alice", f"offline {i}", key=f"k{i}"))
               for i in range(3)]
    await asyncio.sleep(0.1)
    assert not any(p.done() for p in pending)   # queued, not failed
    gate.set()
    acks = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert [(a.seq, a.duplicate) for a in acks] == [(1, False), (2, False), (3, False)]
    got = await collect(alice, 3)
    assert [(m.seq, m.sender, m.text) for m in got] == [
        (1, "bob", "offline 0"), (2, "bob", "offline 1"), (3, "bob", "offline 2")]
    await assert_silent(alice)
    # bob's own devices (this one) see them once too.
    assert [m.seq for m in await collect(bob, 3)] == [1, 2, 3]


async def test_a_publish_whose_ack_was_lost_is_retried_and_answered_as_duplicate(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    for i in range(1, 4):
        await bob.wait_connected(5)
        bob._proto.transport.pause_reading()   # the ack will wait, unread, in the socket
        sending = asyncio.ensure_future(bob.send("alice", f"retry {i}"))
        m = await alice.next_message(timeout=5)   # so the server has sequenced it
        assert (m.seq, m.text) == (i, f"retry {i}")
        assert not sending.done()
        cut(bob)   # the ack is lost with the connection
        ack = await asyncio.wait_for(sending, 5)
        assert (ack.seq, ack.duplicate) == (i, True)
    await assert_silent(alice)
    # bob's own copies, unread when cut, come back by catch-up: once each.
    assert [(m.seq, m.text) for m in await collect(bob, 3)] == [
        (i, f"retry {i}") for i in range(1, 4)]
    await assert_silent(bob)


async def test_org_subscriptions_are_restored_and_resumed_after_reconnect(relay):
    hq = await relay.connect("hq", channels=("org", "org.>"))
    region = await relay.connect("east-lead", read=("org.>",))
    await region.subscribe("org.east")
    gate = hold_reconnect(region)
    await hq.publish("org.east", "before")
    assert [m.text for m in await collect(region, 1)] == ["before"]
    cut(region)
    await wait_disconnected(region)
    await hq.publish("org.east", "while away")
    await hq.publish("org", "root while away")
    await hq.publish("org.west", "not for the east")
    gate.set()
    await region.wait_connected(5)
    await hq.publish("org.east", "after")
    got = await collect(region, 3)
    # Order is per channel; across channels only the sets are fixed.
    assert [(m.channel, m.seq, m.text) for m in got if m.channel == "org.east"] == [
        ("org.east", 2, "while away"), ("org.east", 3, "after")]
    assert [(m.channel, m.seq, m.text) for m in got if m.channel == "org"] == [
        ("org", 1, "root while away")]
    await assert_silent(region)


async def test_history_from_before_subscribing_is_not_replayed_after_a_reconnect(relay):
    hq = await relay.connect("hq", channels=("org", "org.>"))
    await hq.publish("org", "old 1")
    await hq.publish("org", "old 2")
    store = await relay.connect("store42", read=("org.east.store42",))
    assert store.welcome["channels"] == {"org": 2, "org.east": 0, "org.east.store42": 0}
    gate = hold_reconnect(store)
    cut(store)
    await wait_disconnected(store)
    await hq.publish("org", "while away")
    await hq.publish("org.east", "east while away")
    gate.set()
    await store.wait_connected(5)
    await hq.publish("org", "after")
    got = await collect(store, 3)
    assert [(m.channel, m.seq, m.text) for m in got if m.channel == "org"] == [
        ("org", 3, "while away"), ("org", 4, "after")]
    assert [(m.channel, m.seq, m.text) for m in got if m.channel == "org.east"] == [
        ("org.east", 1, "east while away")]
    await assert_silent(store)


async def test_a_member_added_while_away_resumes_from_the_join_not_from_before_it(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    carol = await relay.connect("carol")
    await alice.create_group("g", [])
    await alice.publish("group:g", "before anyone joined")        # seq 2
    gate = hold_reconnect(bob)
    cut(bob)
    await wait_disconnected(bob)
    await alice.add_members("g", ["bob"])                         # seq 3, bob away
    await alice.publish("group:g", "welcome bob")                 # seq 4
    await alice.add_members("g", ["carol"])                       # seq 5, carol online
    gate.set()
    await bob.wait_connected(5)
    got = await collect(bob, 3)
    assert [(m.seq, m.content_type) for m in got] == [
        (3, ContentType.EVENT), (4, ContentType.TEXT), (5, ContentType.EVENT)]
    assert orjson.loads(got[0].payload)["users"] == ["bob"]
    # Online or away at the join, a member's view starts at its own join event,
    # and asking to resume from further back does not reach before it either.
    assert [m.seq for m in await collect(carol, 1)] == [5]
    carol.positions.clear()   # so the client lets any replayed frame through to us
    result = await carol._request(FrameType.SUBSCRIBE, {"channel": "group:g",
                                                        "positions": {"group:g": 0}})
    assert result == {"channel": "group:g", "channels": {"group:g": 5}}
    assert [m.seq for m in await collect(carol, 1)] == [5]   # her join, and nothing older
    await assert_silent(carol)
    with pytest.raises(asyncio.TimeoutError):
        await bob.next_message(timeout=0.05)


async def test_missing_more_than_the_ring_is_recovered_from_the_store(relay_factory):
    relay = relay_factory("--ring-size", "4")
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    gaps: asyncio.Queue[dict] = asyncio.Queue()
    bob.on_gap(gaps.put_nowait)
    gate = hold_reconnect(bob)
    await alice.send("bob", "m1")
    assert [m.seq for m in await collect(bob, 1)] == [1]
    cut(bob)
    await wait_disconnected(bob)
    for i in range(2, 2502):
        await alice.send("bob", f"m{i}")
    gate.set()
    # Live messages keep coming while the store pages are read.
    live = asyncio.ensure_future(asyncio.gather(*(alice.send("bob", f"m{i}") for i in range(2502, 2602))))
    got = await collect(bob, 2600)
    assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(2, 2602)]
    await live
    await assert_silent(bob)
    assert gaps.empty()


async def test_missing_more_than_the_ring_reports_a_gap_without_a_store(relay_factory):
    relay = relay_factory("--ring-size", "4", "--store", "memory")
    try:
        alice = await relay.connect("alice")
        bob = await relay.connect("bob")
        gaps: asyncio.Queue[dict] = asyncio.Queue()
        bob.on_gap(gaps.put_nowait)
        gate = hold_reconnect(bob)
        await alice.send("bob", "m1")
        assert [m.seq for m in await collect(bob, 1)] == [1]
        cut(bob)
        await wait_disconnected(bob)
        for i in range(2, 12):
            await alice.send("bob", f"m{i}")
        gate.set()
        gap = await asyncio.wait_for(gaps.get(), 5)
        assert gap == {"channel": "dm:alice:bob", "after": 1, "first": 8, "head": 11}
        got = await collect(bob, 4)
        assert [(m.seq, m.text) for m in got] == [(i, f"m{i}") for i in range(8, 12)]
        await alice.send("bob", "m12")
        assert [m.seq for m in await collect(bob, 1)] == [12]
        assert gaps.empty()
    finally:
        await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)


async def test_a_client_without_reconnect_fails_fast_once_cut(relay):
    bob = relay.client("bob", reconnect=False)
    await bob.connect()
    cut(bob)
    await wait_disconnected(bob)
    with pytest.raises(fenghuo.ConnectionLost):
        await asyncio.wait_for(bob.send("alice", "anyone?"), 2)
    with pytest.raises(fenghuo.ConnectionLost):
        await asyncio.wait_for(bob.presence(["alice"]), 2)
    assert [m async for m in bob.messages()] == []


async def test_a_server_restart_resets_positions_by_epoch(relay_factory):
    first = relay_factory()
    alice = await first.connect("alice")
    await alice.send("bob", "one")
    await alice.send("bob", "two")
    assert [m.text for m in await collect(alice, 2)] == ["one", "two"]
    assert alice.positions == {"dm:alice:bob": 2}
    old_epoch = alice.epoch
    # A new process with the same secret: a restart without state (the client
    # is pointed at the new port, as a load balancer would).
    first.stop()
    second = relay_factory(f"--secret={first.secret}")
    alice.port = second.port
    try:
        await wait_disconnected(alice)
        await alice.wait_connected(10)
        assert alice.epoch != old_epoch
        assert alice.positions == {}
        ack = await alice.send("bob", "after restart")
        assert ack.seq == 1
        m = await alice.next_message(timeout=5)
        assert (m.seq, m.text) == (1, "after restart")
    finally:
        await alice.close()


async def test_an_expired_token_is_refused_at_connect(relay):
    token = fenghuo.issue_token(relay.secret, "bob", ttl=-60)
    client = fenghuo.Client(relay.server, token=token)
    relay.clients.append(client)
    with pytest.raises(fenghuo.FenghuoError) as info:
        await client.connect()
    assert info.value.code == ErrorCode.TOKEN_EXPIRED


async def test_subscribe_replays_channels_missing_from_the_positions_like_hello(relay):
    """SUBSCRIBE follows HELLO's rule: a channel the client has no position for,
    while it does track positions, is replayed from the start of the ring."""
    from fenghuo.core import decode_message
    from fenghuo.protocol import encode_json
    from rawwire import open_raw

    hq = await relay.connect("hq", channels=("org", "org.>"))
    for channel in ("org", "org", "org.east"):
        await hq.publish(channel, f"to {channel}")
    store = await open_raw(relay)
    welcome = await store.hello(relay.token("store", read=("org.east.s1",)), epoch=None,
                                positions={})
    assert welcome["channels"] == {"org": 2, "org.east": 1, "org.east.s1": 0}
    # Auto-subscribed from the token at HELLO, with positions {}: everything held.
    got = [decode_message((await store.expect(FrameType.MESSAGE)).body) for _ in range(3)]
    assert [(m.channel, m.seq) for m in got] == [("org", 1), ("org", 2), ("org.east", 1)]

    late = await open_raw(relay)
    await late.hello(relay.token("late", read=("org.>",)), epoch=welcome["epoch"], positions={})
    late.write(encode_json(FrameType.SUBSCRIBE, {"channel": "org.east.s2"}, 7))
    assert (await late.expect_json(FrameType.RESULT))["channels"] == {
        "org": 2, "org.east": 1, "org.east.s2": 0}
    got = [decode_message((await late.expect(FrameType.MESSAGE)).body) for _ in range(3)]
    assert [(m.channel, m.seq) for m in got] == [("org", 1), ("org", 2), ("org.east", 1)]
    await late.expect_silence()


@pytest.mark.parametrize("store", ["sqlite", "memory"])
async def test_hello_positions_with_another_epoch_are_kept_only_by_a_durable_relay(
        relay_factory, store):
    """PROTOCOL §6.5's table: a durable relay resumes from the positions whatever
    the epoch; a relay without a store replaces them by ``{}`` (catch-up from 0)."""
    from fenghuo.core import decode_message
    from rawwire import open_raw

    relay = relay_factory(f"--store={store}", workers=1)
    alice = await relay.connect("alice")
    for i in range(4):
        await alice.send("bob", f"m{i}")
    bob = await open_raw(relay)
    welcome = await bob.hello(relay.token("bob"), epoch="000000000000.00000000",
                              positions={"dm:alice:bob": 2})
    assert welcome["durable"] is (store == "sqlite")
    first = 3 if store == "sqlite" else 1
    got = [decode_message((await bob.expect(FrameType.MESSAGE)).body).seq
           for _ in range(first, 5)]
    assert got == list(range(first, 5))
    await bob.expect_silence()


def messages_sequenced(relay) -> float:
    text = urllib.request.urlopen(f"http://{relay.host}:{relay.metrics_port}/metrics", timeout=10).read()
    found = re.search(r"^fenghuo_messages_published_total (\S+)$", text.decode(), re.MULTILINE)
    assert found, "no fenghuo_messages_published_total in /metrics"
    return float(found.group(1))


@pytest.mark.parametrize("how", ["SUBSCRIBE", "HELLO"])
async def test_a_subscription_that_starts_while_a_message_goes_to_the_disk_gets_it_once(
        relay_factory, how):
    """Under ``--fsync always`` a message is sequenced (its seq counted) at once and
    delivered once stored; here the writer waits 3 s before each batch, as a slow
    disk makes it (FENGHUO_TEST_WRITE_DELAY).  bob's subscription to org.news starts
    in between, by SUBSCRIBE or HELLO: the head his reply gives is the last seq
    delivered, so m, released after, reaches him live, once, after that head
    (PROTOCOL §3.3; DESIGN, "A subscription that starts later").  With the last
    seq assigned as the head (before 06eec9e) the reply counted m, which a
    client then takes for history and drops.  (This Python client kept it: the
    relay's stored positions for the device, WELCOME's ``resumed``, gave it
    org.news at 0 first.)"""
    relay = relay_factory("--fsync", "always", workers=1, env={"FENGHUO_TEST_WRITE_DELAY": "3"})
    news = "org.news"
    alice = await relay.connect("alice", channels=(news,))
    bob = relay.client("bob", channels=(news,)) if how == "HELLO" else relay.client("bob", read=(news,))
    if how == "SUBSCRIBE":
        await bob.connect()
    before = messages_sequenced(relay)
    sending = asyncio.ensure_future(alice.publish(news, "m"))
    while messages_sequenced(relay) == before:          # m sequenced, on its way to the disk
        await asyncio.sleep(0.05)
    if how == "SUBSCRIBE":
        head = (await bob.subscribe(news))["channels"][news]
    else:
        head = (await bob.connect()).welcome["channels"][news]
    assert not sending.done(), "m was stored before bob's subscription started: no race"
    ack = await asyncio.wait_for(sending, 20)
    got = await asyncio.wait_for(bob.next_message(), 10)
    assert (got.seq, got.payload) == (ack.seq, b"m")
    assert head == ack.seq - 1
    then = await alice.publish(news, "m2")                  # next: m came once
    got = await asyncio.wait_for(bob.next_message(), 10)
    assert (got.seq, got.payload) == (then.seq, b"m2")
