"""Groups (members, roles, events) and organisation channels (prefix broadcast)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

import fenghuo
from fenghuo import ContentType, ErrorCode, FenghuoError
from clients import assert_silent, collect


async def refused(awaitable, code: int) -> FenghuoError:
    """Await ``awaitable`` and check that the server refused it with ``code``."""
    with pytest.raises(FenghuoError) as info:
        await asyncio.wait_for(awaitable, 5)
    assert info.value.code == code, info.value
    return info.value


def event(message: fenghuo.Message) -> tuple[int, str, dict]:
    assert message.content_type == ContentType.EVENT, message
    return message.seq, message.sender, orjson.loads(message.payload)


# ---------------------------------------------------------------- groups


async def test_group_lifecycle_events_and_permissions(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    carol = await relay.connect("carol")
    dave = await relay.connect("dave")
    mallory = await relay.connect("mallory")
    everyone = (alice, bob, carol, dave)

    created = await alice.create_group("team", ["bob", "carol"], title="The Team")
    assert created == {"group": "team", "channel": "group:team", "title": "The Team",
                       "owner": "alice", "members": 3, "seq": 1}
    for member in (alice, bob, carol):
        assert event(await member.next_message(timeout=5)) == (
            1, "alice", {"event": "created", "by": "alice", "users": ["alice", "bob", "carol"]})

    # Only the owner or an admin adds; only the owner appoints admins or changes roles.
    await refused(bob.add_members("team", ["dave"]), ErrorCode.FORBIDDEN)
    await refused(bob.set_role("team", "carol", "admin"), ErrorCode.FORBIDDEN)
    assert await alice.add_members("team", ["dave", "bob"]) == {"group": "team", "added": ["dave"]}
    join = (2, "alice", {"event": "join", "by": "alice", "users": ["dave"], "role": "member"})
    for member in everyone:   # dave too: he is subscribed before the event is published
        [m] = await collect(member, 1)
        assert event(m) == join

    assert await alice.set_role("team", "bob", "admin") == {
        "group": "team", "user": "bob", "role": "admin"}
    role = (3, "alice", {"event": "role", "by": "alice", "user": "bob", "role": "admin"})
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == role
    await refused(bob.add_members("team", ["erin"], role="admin"), ErrorCode.FORBIDDEN)
    assert await bob.add_members("team", ["erin"]) == {"group": "team", "added": ["erin"]}
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == (
            4, "bob", {"event": "join", "by": "bob", "users": ["erin"], "role": "member"})

    assert await carol.group_members("team") == {
        "alice": "owner", "bob": "admin", "carol": "member", "dave": "member", "erin": "member"}
    assert await bob.list_groups() == [{"group": "team", "channel": "group:team",
                                        "title": "The Team", "owner": "alice", "members": 5,
                                        "role": "admin"}]
    assert await mallory.list_groups() == []

    # Outsiders may neither write, read, nor look at the member list.
    await refused(mallory.publish("group:team", "hi all"), ErrorCode.FORBIDDEN)
    await refused(mallory.subscribe("group:team"), ErrorCode.FORBIDDEN)
    await refused(mallory.group_members("team"), ErrorCode.FORBIDDEN)
    await refused(mallory.add_members("team", ["mallory"]), ErrorCode.FORBIDDEN)

    # A member leaves: everyone, the leaver included, sees the event; then silence for her.
    assert await carol.leave_group("team") == {"group": "team", "removed": ["carol"]}
    leave = (5, "carol", {"event": "leave", "by": "carol", "users": ["carol"]})
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == leave
    assert await carol.list_groups() == []

    # Dave has published (so his connection caches the channel), then is removed.
    assert (await dave.publish("group:team", "dave was here")).seq == 6
    for member in (alice, bob, dave):
        assert (await member.next_message(timeout=5)).text == "dave was here"
    assert await alice.remove_members("team", ["dave"]) == {"group": "team", "removed": ["dave"]}
    removal = (7, "alice", {"event": "leave", "by": "alice", "users": ["dave"]})
    for member in (alice, bob, dave):
        assert event(await member.next_message(timeout=5)) == removal
    await refused(dave.publish("group:team", "still here?"), ErrorCode.FORBIDDEN)
    await refused(dave.subscribe("group:team"), ErrorCode.FORBIDDEN)
    assert (await bob.publish("group:team", "members only now")).seq == 8
    for member in (alice, bob):
        m = await member.next_message(timeout=5)
        assert (m.seq, m.sender, m.text, m.content_type) == (
            8, "bob", "members only now", ContentType.TEXT)
    for gone in (carol, dave, mallory):
        await assert_silent(gone, 0.1)
    await assert_silent(alice, 0.05)

    assert await alice.group_members("team") == {
        "alice": "owner", "bob": "admin", "erin": "member"}


async def test_owner_cannot_leave_until_ownership_is_handed_over(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    await alice.create_group("club", ["bob"])
    await refused(alice.leave_group("club"), ErrorCode.CONFLICT)
    await refused(bob.remove_members("club", ["alice"]), ErrorCode.FORBIDDEN)
    await refused(alice.remove_members("club", ["alice"]), ErrorCode.FORBIDDEN)
    await refused(alice.create_group("club"), ErrorCode.CONFLICT)
    await refused(alice.add_members("nope", ["bob"]), ErrorCode.NOT_FOUND)

    await alice.set_role("club", "bob", "owner")
    assert await bob.group_members("club") == {"alice": "admin", "bob": "owner"}
    assert await alice.leave_group("club") == {"group": "club", "removed": ["alice"]}
    assert await bob.group_members("club") == {"bob": "owner"}
    events = [event(m)[2]["event"] for m in await collect(bob, 3)]
    assert events == ["created", "role", "leave"]


async def test_an_admin_cannot_remove_another_admin(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    await alice.create_group("ops", ["bob", "carol"])
    await alice.set_role("ops", "bob", "admin")
    await alice.set_role("ops", "carol", "admin")
    await refused(bob.remove_members("ops", ["carol"]), ErrorCode.FORBIDDEN)
    assert await alice.remove_members("ops", ["carol"]) == {"group": "ops", "removed": ["carol"]}


async def test_members_offline_at_creation_are_subscribed_when_they_connect(relay):
    alice = await relay.connect("alice")
    await alice.create_group("later", ["bob"])
    await alice.publish("group:later", "before bob connected")
    bob = await relay.connect("bob")
    assert bob.welcome["channels"] == {"group:later": 2}
    bob_tablet = await relay.connect("bob")
    await alice.publish("group:later", "hello bob")
    for device in (bob, bob_tablet):
        m = await device.next_message(timeout=5)
        assert (m.channel, m.seq, m.sender, m.text) == ("group:later", 3, "alice", "hello bob")
    # Removing bob unsubscribes every one of his devices.
    await alice.remove_members("later", ["bob"])
    for device in (bob, bob_tablet):
        assert event(await device.next_message(timeout=5))[2]["users"] == ["bob"]
    await alice.publish("group:later", "bye")
    await assert_silent(bob)
    await assert_silent(bob_tablet, 0.05)


# ---------------------------------------------------------------- organisation channels


async def test_org_prefix_broadcast_reaches_exactly_what_is_at_or_above_each_subscriber(relay):
    # "org.>" covers everything below org, not org itself (NATS semantics), so
    # head office is granted the root by name as well.
    hq = await relay.connect("hq", channels=("org", "org.>"))
    region = await relay.connect("east-lead", read=("org.>",))
    store42 = await relay.connect("store42", read=("org.east.store42",))
    store7 = await relay.connect("store7", read=("org.west.store7",))

    # Concrete channels in a token are subscribed at HELLO, with their ancestors.
    assert store42.welcome["channels"] == {"org": 0, "org.east": 0, "org.east.store42": 0}
    assert store7.welcome["channels"] == {"org": 0, "org.west": 0, "org.west.store7": 0}
    assert region.welcome["channels"] == {}   # a pattern grants, it does not subscribe
    assert await region.subscribe("org.east") == {
        "channel": "org.east", "channels": {"org": 0, "org.east": 0}}

    sent = [("org", "to everyone"), ("org.east", "to the east"),
            ("org.east.store42", "to store 42"), ("org.west", "to the west"),
            ("org.west.store7", "to store 7"), ("org.north", "to the north"),
            ("org.east", "east again")]
    for channel, text in sent:
        ack = await hq.publish(channel, text)
        assert ack.channel == channel
    expect = {
        hq: [("org", 1, "to everyone")],
        region: [("org", 1, "to everyone"), ("org.east", 1, "to the east"),
                 ("org.east", 2, "east again")],
        store42: [("org", 1, "to everyone"), ("org.east", 1, "to the east"),
                  ("org.east.store42", 1, "to store 42"), ("org.east", 2, "east again")],
        store7: [("org", 1, "to everyone"), ("org.west", 1, "to the west"),
                 ("org.west.store7", 1, "to store 7")],
    }
    for client, want in expect.items():
        got = await collect(client, len(want))
        assert [(m.channel, m.seq, m.text) for m in got] == want
        assert all(m.sender == "hq" for m in got)
    for client in expect:
        await assert_silent(client, 0.1)


async def test_org_grants_read_only_and_forbidden(relay):
    hq = await relay.connect("hq", channels=("org.>",))
    store = await relay.connect("store42", read=("org.east.store42",))
    await refused(store.publish("org.east.store42", "can I write?"), ErrorCode.FORBIDDEN)
    await refused(store.publish("org.east", "or here?"), ErrorCode.FORBIDDEN)
    await refused(store.subscribe("org.west"), ErrorCode.FORBIDDEN)
    await refused(store.subscribe("org.east.store43"), ErrorCode.FORBIDDEN)
    await refused(hq.publish("org", "root is not below org.>"), ErrorCode.FORBIDDEN)
    await refused(hq.subscribe("elsewhere.x"), ErrorCode.INVALID_CHANNEL)
    # The connection survives every refusal.
    assert (await hq.publish("org.east.store42", "only for you")).seq == 1
    m = await store.next_message(timeout=5)
    assert (m.channel, m.seq, m.sender, m.text) == ("org.east.store42", 1, "hq", "only for you")


async def test_admin_role_may_publish_and_subscribe_anywhere(relay):
    bot = await relay.connect("bot", roles=("admin",))
    listener = await relay.connect("listener", read=("org.a.b",))
    await bot.subscribe("org.a")
    ack = await bot.publish("org", "announcement")
    assert (ack.channel, ack.seq) == ("org", 1)
    for client in (bot, listener):
        m = await client.next_message(timeout=5)
        assert (m.channel, m.seq, m.text) == ("org", 1, "announcement")


async def test_unsubscribe_stops_prefix_delivery_but_keeps_other_paths(relay):
    hq = await relay.connect("hq", channels=("org", "org.>"))
    region = await relay.connect("east-lead", read=("org.>",))
    await region.subscribe("org.east")
    await region.subscribe("org.east.store42")   # org and org.east now reached twice
    await hq.publish("org.east", "one")
    assert [m.seq for m in await collect(region, 1)] == [1]   # reached twice, received once
    await region.unsubscribe("org.east.store42")
    await hq.publish("org.east", "two")
    assert [m.text for m in await collect(region, 1)] == ["two"]
    await region.unsubscribe("org.east")
    await hq.publish("org.east", "three")
    await hq.publish("org", "four")
    await assert_silent(region)
    await refused(region.unsubscribe("org.east"), ErrorCode.NOT_FOUND)
