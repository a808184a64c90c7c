"""Presence: query, watch, and events as devices come and go; who may see whom.

Watchers hold tokens with the ``presence`` claim unless a test is about
visibility (PROTOCOL §3.17), which the last tests check.
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


async def test_query_reports_online_state_and_device_count(relay):
    alice = await relay.connect("alice", presence=True)
    await relay.connect("bob")
    await relay.connect("bob")
    assert await alice.presence(["alice", "bob", "carol"]) == {
        "alice": online(1), "bob": online(2), "carol": OFFLINE}
    assert await alice.presence([]) == {}


async def test_watch_sees_first_device_connect_each_device_and_last_device_leave(relay):
    alice = await relay.connect("alice", presence=True)
    events = watch_events(alice)
    assert await alice.watch_presence(["bob"]) == {"bob": OFFLINE}

    bob_phone = await relay.connect("bob")
    assert await next_event(events) == {"user": "bob", **online(1)}
    bob_laptop = await relay.connect("bob")
    assert await next_event(events) == {"user": "bob", **online(2)}
    assert await alice.presence(["bob"]) == {"bob": online(2)}

    await bob_laptop.close()
    assert await next_event(events) == {"user": "bob", **online(1)}
    await bob_phone.close()
    assert await next_event(events) == {"user": "bob", **OFFLINE}
    assert await alice.presence(["bob"]) == {"bob": OFFLINE}

    # Someone not watched comes and goes: no event.
    await (await relay.connect("carol")).close()
    await asyncio.sleep(QUIET)
    assert events.empty()


async def test_an_abrupt_disconnect_is_reported_like_a_clean_one(relay):
    alice = await relay.connect("alice", presence=True)
    events = watch_events(alice)
    bob = relay.client("bob", reconnect=False)
    await alice.watch_presence(["bob"])
    await bob.connect()
    assert await next_event(events) == {"user": "bob", **online(1)}
    bob._proto.transport.abort()   # no goodbye: the TCP connection is reset
    assert await next_event(events) == {"user": "bob", **OFFLINE}


async def test_unwatch_stops_events_and_watchers_going_away_is_harmless(relay):
    alice = await relay.connect("alice", presence=True)
    carol = await relay.connect("carol", presence=True)
    alice_events, carol_events = watch_events(alice), watch_events(carol)
    await alice.watch_presence(["bob"])
    await carol.watch_presence(["bob"])
    assert await alice.unwatch_presence(["bob"]) == {"bob": OFFLINE}

    bob = await relay.connect("bob")
    assert await next_event(carol_events) == {"user": "bob", **online(1)}
    await carol.close()   # a watcher that left is dropped, not written to
    await bob.close()
    await asyncio.sleep(QUIET)
    assert alice_events.empty()
    assert await alice.presence(["bob", "carol"]) == {"bob": OFFLINE, "carol": OFFLINE}


async def test_malformed_presence_requests_are_refused(relay):
    alice = await relay.connect("alice", presence=True)
    for body in ({"op": "query", "users": "bob"}, {"op": "query", "users": ["not a user!"]},
                 {"op": "shout", "users": ["bob"]}):
        with pytest.raises(FenghuoError) as info:
            await asyncio.wait_for(alice._request(fenghuo.client.FrameType.PRESENCE, body), 5)
        assert info.value.code == ErrorCode.MALFORMED_BODY
    assert await alice.presence(["alice"]) == {"alice": online(1)}


async def test_a_presence_watch_survives_a_reconnect(relay):
    alice = await relay.connect("alice", presence=True)
    events = watch_events(alice)
    await alice.watch_presence(["bob"])
    first = alice._proto
    first.transport.abort()
    await asyncio.wait_for(_reconnected(alice, first), 10)
    bob = await relay.connect("bob")
    assert await next_event(events) == {"user": "bob", **online(1)}
    await bob.close()
    assert await next_event(events) == {"user": "bob", **OFFLINE}


async def _reconnected(client, old_proto):
    while client._proto is None or client._proto is old_proto or not client.connected:
        await asyncio.sleep(0.02)


HIDDEN = {"online": False, "devices": 0, "hidden": True}


async def test_presence_is_hidden_until_a_direct_channel_is_shared(relay):
    eve = await relay.connect("eve")
    events = watch_events(eve)
    bob = await relay.connect("bob")
    assert await eve.presence(["bob", "eve"]) == {"bob": HIDDEN, "eve": online(1)}
    assert await eve.watch_presence(["bob"]) == {"bob": HIDDEN}
    await (await relay.connect("bob")).close()      # comes and goes: eve is not told
    await asyncio.sleep(QUIET)
    assert events.empty()
    await eve.send("bob", "hello")                  # a direct channel: they share it now
    assert await eve.presence(["bob"]) == {"bob": online(1)}
    await bob.close()
    assert await next_event(events) == {"user": "bob", **OFFLINE}


async def test_group_members_see_each_other_until_one_leaves(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    carol = await relay.connect("carol")
    await alice.create_group("ops", members=["bob"])
    assert await alice.presence(["bob", "carol"]) == {"bob": online(1), "carol": HIDDEN}
    assert await carol.presence(["alice", "bob"]) == {"alice": HIDDEN, "bob": HIDDEN}
    events = watch_events(alice)
    await alice.watch_presence(["bob"])
    await (await relay.connect("bob")).close()
    assert await next_event(events) == {"user": "bob", **online(2)}
    assert await next_event(events) == {"user": "bob", **online(1)}
    await bob.leave_group("ops")
    await asyncio.sleep(QUIET)                      # the leave reaches every worker
    await bob.close()                               # no longer shared: no event
    await asyncio.sleep(QUIET)
    assert events.empty()
    assert await alice.presence(["bob"]) == {"bob": HIDDEN}


async def test_the_presence_claim_sees_everyone(relay):
    await relay.connect("bob")
    ops = await relay.connect("ops-bot", presence=True)
    assert await ops.presence(["bob", "nobody"]) == {"bob": online(1), "nobody": OFFLINE}
