"""Groups (members, roles, events) and organisation channels (prefix broadcast).

The group tests share one relay (``shared_relay``), each with users and groups
of its own (``names``); the organisation channels' tests each start their own,
as the organisation's tree (``org`` and below) is one for the whole relay.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

import fenghuo
from fenghuo import ContentType, ErrorCode, FenghuoError
from fenghuo.channels import group_channel
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


async def test_group_lifecycle_events_and_permissions(shared_relay, names):
    relay = shared_relay
    team_channel = group_channel(names("team"))
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    carol = await relay.connect(names("carol"))
    dave = await relay.connect(names("dave"))
    mallory = await relay.connect(names("mallory"))
    everyone = (alice, bob, carol, dave)

    created = await alice.create_group(names("team"), [names("bob"), names("carol")], title="The Team")
    assert created == {"group": names("team"), "channel": team_channel, "title": "The Team",
                       "owner": names("alice"), "members": 3, "seq": 1}
    for member in (alice, bob, carol):
        assert event(await member.next_message(timeout=5)) == (
            1, names("alice"), {"event": "created", "by": names("alice"),
                                "users": [names("alice"), names("bob"), names("carol")]})

    # Only the owner or an admin adds; only the owner appoints admins or changes roles.
    await refused(bob.add_members(names("team"), [names("dave")]), ErrorCode.FORBIDDEN)
    await refused(bob.set_role(names("team"), names("carol"), "admin"), ErrorCode.FORBIDDEN)
    assert await alice.add_members(names("team"), [names("dave"), names("bob")]) == {
        "group": names("team"), "added": [names("dave")]}
    join = (2, names("alice"), {"event": "join", "by": names("alice"), "users": [names("dave")],
                                "role": "member"})
    for member in everyone:   # dave too: he is subscribed before the event is published
        [m] = await collect(member, 1)
        assert event(m) == join

    assert await alice.set_role(names("team"), names("bob"), "admin") == {
        "group": names("team"), "user": names("bob"), "role": "admin"}
    role = (3, names("alice"), {"event": "role", "by": names("alice"), "user": names("bob"),
                                "role": "admin"})
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == role
    await refused(bob.add_members(names("team"), [names("erin")], role="admin"), ErrorCode.FORBIDDEN)
    assert await bob.add_members(names("team"), [names("erin")]) == {
        "group": names("team"), "added": [names("erin")]}
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == (
            4, names("bob"), {"event": "join", "by": names("bob"), "users": [names("erin")],
                              "role": "member"})

    assert await carol.group_members(names("team")) == {
        names("alice"): "owner", names("bob"): "admin", names("carol"): "member",
        names("dave"): "member", names("erin"): "member"}
    assert await bob.list_groups() == [{"group": names("team"), "channel": team_channel,
                                        "title": "The Team", "owner": names("alice"), "members": 5,
                                        "role": "admin"}]
    assert await mallory.list_groups() == []

    # Outsiders may neither write, read, nor look at the member list.
    await refused(mallory.publish(team_channel, "hi all"), ErrorCode.FORBIDDEN)
    await refused(mallory.subscribe(team_channel), ErrorCode.FORBIDDEN)
    await refused(mallory.group_members(names("team")), ErrorCode.FORBIDDEN)
    await refused(mallory.add_members(names("team"), [names("mallory")]), ErrorCode.FORBIDDEN)

    # A member leaves: everyone, the leaver included, sees the event; then silence for her.
    assert await carol.leave_group(names("team")) == {
        "group": names("team"), "removed": [names("carol")]}
    leave = (5, names("carol"), {"event": "leave", "by": names("carol"), "users": [names("carol")]})
    for member in everyone:
        assert event(await member.next_message(timeout=5)) == leave
    assert await carol.list_groups() == []

    # Dave has published (so his connection caches the channel), then is removed.
    assert (await dave.publish(team_channel, "dave was here")).seq == 6
    for member in (alice, bob, dave):
        assert (await member.next_message(timeout=5)).text == "dave was here"
    assert await alice.remove_members(names("team"), [names("dave")]) == {
        "group": names("team"), "removed": [names("dave")]}
    removal = (7, names("alice"), {"event": "leave", "by": names("alice"), "users": [names("dave")]})
    for member in (alice, bob, dave):
        assert event(await member.next_message(timeout=5)) == removal
    await refused(dave.publish(team_channel, "still here?"), ErrorCode.FORBIDDEN)
    await refused(dave.subscribe(team_channel), ErrorCode.FORBIDDEN)
    assert (await bob.publish(team_channel, "members only now")).seq == 8
    for member in (alice, bob):
        m = await member.next_message(timeout=5)
        assert (m.seq, m.sender, m.text, m.content_type) == (
            8, names("bob"), "members only now", ContentType.TEXT)
    for gone in (carol, dave, mallory):
        await assert_silent(gone, 0.1)
    await assert_silent(alice, 0.05)

    assert await alice.group_members(names("team")) == {
        names("alice"): "owner", names("bob"): "admin", names("erin"): "member"}


async def test_owner_cannot_leave_until_ownership_is_handed_over(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    await alice.create_group(names("club"), [names("bob")])
    await refused(alice.leave_group(names("club")), ErrorCode.CONFLICT)
    await refused(bob.remove_members(names("club"), [names("alice")]), ErrorCode.FORBIDDEN)
    await refused(alice.remove_members(names("club"), [names("alice")]), ErrorCode.FORBIDDEN)
    await refused(alice.create_group(names("club")), ErrorCode.CONFLICT)
    await refused(alice.add_members(names("nope"), [names("bob")]), ErrorCode.NOT_FOUND)

    await alice.set_role(names("club"), names("bob"), "owner")
    assert await bob.group_members(names("club")) == {names("alice"): "admin", names("bob"): "owner"}
    assert await alice.leave_group(names("club")) == {
        "group": names("club"), "removed": [names("alice")]}
    assert await bob.group_members(names("club")) == {names("bob"): "owner"}
    events = [event(m)[2]["event"] for m in await collect(bob, 3)]
    assert events == ["created", "role", "leave"]


async def test_an_admin_cannot_remove_another_admin(shared_relay, names):
    relay = shared_relay
    alice = await relay.connect(names("alice"))
    bob = await relay.connect(names("bob"))
    await alice.create_group(names("ops"), [names("bob"), names("carol")])
    await alice.set_role(names("ops"), names("bob"), "admin")
    await alice.set_role(names("ops"), names("carol"), "admin")
    await refused(bob.remove_members(names("ops"), [names("carol")]), ErrorCode.FORBIDDEN)
    assert await alice.remove_members(names("ops"), [names("carol")]) == {
        "group": names("ops"), "removed": [names("carol")]}


async def test_members_offline_at_creation_are_subscribed_when_they_connect(shared_relay, names):
    relay = shared_relay
    later_channel = group_channel(names("later"))
    alice = await relay.connect(names("alice"))
    await alice.create_group(names("later"), [names("bob")])
    await alice.publish(later_channel, "before bob connected")
    bob = await relay.connect(names("bob"))
    assert bob.welcome["channels"] == {later_channel: 2}
    bob_tablet = await relay.connect(names("bob"))
    await alice.publish(later_channel, "hello bob")
    for device in (bob, bob_tablet):
        m = await device.next_message(timeout=5)
        assert (m.channel, m.seq, m.sender, m.text) == (later_channel, 3, names("alice"), "hello bob")
    # Removing bob unsubscribes every one of his devices.
    await alice.remove_members(names("later"), [names("bob")])
    for device in (bob, bob_tablet):
        assert event(await device.next_message(timeout=5))[2]["users"] == [names("bob")]
    await alice.publish(later_channel, "bye")
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
