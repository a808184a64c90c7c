"""Presence: query, watch, and events as devices come and go; who may see whom.

Watchers hold tokens with the ``presence`` claim unless a test is about
visibility (PROTOCOL §3.17), which the last tests check.  The tests share one
relay (``shared_relay``), each with users and groups of its own (``names``).
"""

from __future__ import annotations

import asyncio

import pytest

import fenghuo
from fenghuo import ErrorCode, FenghuoError
from clients import QUIET

OFFLINE = {"online": False, "devices": 0}


def online(devices: int) -> dict:
    return {"online": True, "devices": devices}


def watch_events(client: fenghuo.Client) -> asyncio.Queue[dict]:
    events: asyncio.Queue[dict] = asyncio.Queue()
    client.on_presence(events.put_nowait)
    return events


async def next_event(events: asyncio.Queue[dict]) -> dict:
    return await asyncio.wait_for(events.get(), 5)


async def test_query_reports_online_state_and_device_count(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    await relay.connect(names("bob"))
    await relay.connect(names("bob"))
    assert await alice.presence([names("alice"), names("bob"), names("carol")]) == {
        names("alice"): online(1), names("bob"): online(2), names("carol"): OFFLINE}
    assert await alice.presence([]) == {}


async def test_watch_sees_first_device_connect_each_device_and_last_device_leave(
        shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    events = watch_events(alice)
    assert await alice.watch_presence([names("bob")]) == {names("bob"): OFFLINE}

    bob_phone = await relay.connect(names("bob"))
    assert await next_event(events) == {"user": names("bob"), **online(1)}
    bob_laptop = await relay.connect(names("bob"))
    assert await next_event(events) == {"user": names("bob"), **online(2)}
    assert await alice.presence([names("bob")]) == {names("bob"): online(2)}

    await bob_laptop.close()
    assert await next_event(events) == {"user": names("bob"), **online(1)}
    await bob_phone.close()
    assert await next_event(events) == {"user": names("bob"), **OFFLINE}
    assert await alice.presence([names("bob")]) == {names("bob"): OFFLINE}

    # Someone not watched comes and goes: no event.
    await (await relay.connect(names("carol"))).close()
    await asyncio.sleep(QUIET)
    assert events.empty()


async def test_an_abrupt_disconnect_is_reported_like_a_clean_one(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    events = watch_events(alice)
    bob = relay.client(names("bob"), reconnect=False)
    await alice.watch_presence([names("bob")])
    await bob.connect()
    assert await next_event(events) == {"user": names("bob"), **online(1)}
    bob._proto.transport.abort()   # no goodbye: the TCP connection is reset
    assert await next_event(events) == {"user": names("bob"), **OFFLINE}


async def test_unwatch_stops_events_and_watchers_going_away_is_harmless(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    carol = await relay.connect(names("carol"), presence=True)
    alice_events, carol_events = watch_events(alice), watch_events(carol)
    await alice.watch_presence([names("bob")])
    await carol.watch_presence([names("bob")])
    assert await alice.unwatch_presence([names("bob")]) == {names("bob"): OFFLINE}

    bob = await relay.connect(names("bob"))
    assert await next_event(carol_events) == {"user": names("bob"), **online(1)}
    await carol.close()   # a watcher that left is dropped, not written to
    await bob.close()
    await asyncio.sleep(QUIET)
    assert alice_events.empty()
    assert await alice.presence([names("bob"), names("carol")]) == {
        names("bob"): OFFLINE, names("carol"): OFFLINE}


async def test_malformed_presence_requests_are_refused(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    for body in ({"op": "query", "users": names("bob")}, {"op": "query", "users": ["not a user!"]},
                 {"op": "shout", "users": [names("bob")]}):
        with pytest.raises(FenghuoError) as info:
            await asyncio.wait_for(alice._request(fenghuo.client.FrameType.PRESENCE, body), 5)
        assert info.value.code == ErrorCode.MALFORMED_BODY
    assert await alice.presence([names("alice")]) == {names("alice"): online(1)}


async def test_a_presence_watch_survives_a_reconnect(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"), presence=True)
    events = watch_events(alice)
    await alice.watch_presence([names("bob")])
    first = alice._proto
    first.transport.abort()
    await asyncio.wait_for(_reconnected(alice, first), 10)
    bob = await relay.connect(names("bob"))
    assert await next_event(events) == {"user": names("bob"), **online(1)}
    await bob.close()
    assert await next_event(events) == {"user": names("bob"), **OFFLINE}


async def _reconnected(client, old_proto):
    while client._proto is None or client._proto is old_proto or not client.connected:
        await asyncio.sleep(0.02)


HIDDEN = {"online": False, "devices": 0, "hidden": True}


async def test_presence_is_hidden_until_a_direct_channel_is_shared(shared_relay, names):
    relay = shared_relay
    eve = await relay.connect(names("eve"))
    events = watch_events(eve)
    bob = await relay.connect(names("bob"))
    assert await eve.presence([names("bob"), names("eve")]) == {
        names("bob"): HIDDEN, names("eve"): online(1)}
    assert await eve.watch_presence([names("bob")]) == {names("bob"): HIDDEN}
    await (await relay.connect(names("bob"))).close()      # comes and goes: eve is not told
    await asyncio.sleep(QUIET)
    assert events.empty()
    await eve.send(names("bob"), "hello")                  # a direct channel: they share it now
    assert await eve.presence([names("bob")]) == {names("bob"): online(1)}
    await bob.close()
    assert await next_event(events) == {"user": names("bob"), **OFFLINE}


async def test_group_members_see_each_other_until_one_leaves(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    carol = await relay.connect(names("carol"))
    await alice.create_group(names("ops"), members=[names("bob")])
    assert await alice.presence([names("bob"), names("carol")]) == {
        names("bob"): online(1), names("carol"): HIDDEN}
    assert await carol.presence([names("alice"), names("bob")]) == {
        names("alice"): HIDDEN, names("bob"): HIDDEN}
    events = watch_events(alice)
    await alice.watch_presence([names("bob")])
    await (await relay.connect(names("bob"))).close()
    assert await next_event(events) == {"user": names("bob"), **online(2)}
    assert await next_event(events) == {"user": names("bob"), **online(1)}
    await bob.leave_group(names("ops"))
    await asyncio.sleep(QUIET)                      # the leave reaches every worker
    await bob.close()                               # no longer shared: no event
    await asyncio.sleep(QUIET)
    assert events.empty()
    assert await alice.presence([names("bob")]) == {names("bob"): HIDDEN}


async def test_the_presence_claim_sees_everyone(shared_relay, names):
    relay = shared_relay
    await relay.connect(names("bob"))
    ops = await relay.connect(names("ops-bot"), presence=True)
    assert await ops.presence([names("bob"), names("nobody")]) == {
        names("bob"): online(1), names("nobody"): OFFLINE}
