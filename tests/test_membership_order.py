"""A membership change is in effect on a worker (node) no later than the event
announcing it is delivered there (PROTOCOL §3.16, "Membership and its events").

The default deployment (one worker per core), a real relay over real TCP: the
group's channel is sequenced by worker 0, the member whose membership changes
is connected to worker 1 (a replica's) or to worker 0, and the changes come in
many quick cycles while his worker's store is kept busy (a store turn is what
a leaver's unsubscription waited for: on a replica it let him receive what
followed his leave event, and have SUBSCRIBE and RECEIPT accepted).  Then the
same between two nodes of a cluster on three nats-servers.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import fenghuo
from fenghuo import ErrorCode, FenghuoError
from fenghuo.core import FrameType
from fenghuo.protocol import encode_json, encode_publish
from fenghuo.server.routing import owner_of
from rawwire import open_raw
import test_cluster

CYCLES = 40

#: the fixture starting nodes of a cluster on three nats-servers
nodes = test_cluster.nodes


def several(relay) -> None:
    if relay.workers < 2:
        pytest.skip("needs several workers (one per core): this machine has one core")


async def on_worker(relay, user: str, worker: int) -> fenghuo.Client:
    """A connected client of ``user`` on ``worker`` (reconnected until the kernel puts it there)."""
    for _ in range(100):
        client = await relay.connect(user)
        if client.welcome["worker"] == worker:
            return client
        await client.close()
    pytest.fail(f"{user}'s connections never reached worker {worker}")


def owned_by(relay, worker: int, name) -> str:
    """The first ``name(k)`` whose channel ``worker`` sequences."""
    return next(n for n in (name(k) for k in range(1000)) if owner_of(n, relay.workers) == worker)


async def refused(awaitable, code: int, what: str) -> None:
    try:
        await asyncio.wait_for(awaitable, 5)
    except FenghuoError as exc:
        assert exc.code == code, f"{what}: {exc}"
        return
    pytest.fail(f"{what}: accepted")


async def next_event(client: fenghuo.Client, event: str) -> fenghuo.Message:
    """The next EVENT message ``event`` of ``client``, passing over anything else."""
    while True:
        try:
            message = await client.next_message(timeout=5)
        except TimeoutError:
            pytest.fail(f"{client.user} never received its {event!r} event")
        if (message.content_type == fenghuo.ContentType.EVENT
                and f'"event":"{event}"'.encode() in message.payload):
            return message


@contextlib.asynccontextmanager
async def busy_store(relay, worker: int):
    """Keep ``worker``'s store writer busy: publishes to a channel it sequences."""
    channel = owned_by(relay, worker, lambda k: f"org.busy{k}")
    client = await relay.connect("loader", channels=(channel,))
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            await asyncio.gather(*(client.publish(channel, "x" * 200) for _ in range(20)))

    task = asyncio.create_task(publish())
    try:
        yield
    finally:
        stop.set()
        await task


async def changes_of_membership(owner: fenghuo.Client, dave: fenghuo.Client,
                                bob: fenghuo.Client, group: str, cycles: int) -> None:
    """``owner`` adds and removes ``dave`` ``cycles`` times, ``bob`` a member throughout.

    Added: once dave has his join event, he subscribes and publishes at once; made
    a reader, once he has the role event, his publish is refused; a member again,
    accepted.
    Removed: once he has his leave event, SUBSCRIBE, PUBLISH, HISTORY and RECEIPT
    of the group are refused, and nothing published after it reaches him.
    """
    channel = f"group:{group}"
    for cycle in range(cycles):
        await owner.add_members(group, ["dave"])
        await next_event(dave, "join")
        assert (await dave.subscribe(channel))["channel"] == channel
        await dave.publish(channel, f"dave {cycle}")
        await owner.set_role(group, "dave", "reader")
        await next_event(dave, "role")
        await refused(dave.publish(channel, "silenced?"), ErrorCode.FORBIDDEN,
                      f"PUBLISH of a reader, cycle {cycle}")
        await owner.set_role(group, "dave", "member")
        await next_event(dave, "role")
        await dave.publish(channel, f"dave again {cycle}")

        await owner.remove_members(group, ["dave"])
        leave = await next_event(dave, "leave")
        await refused(dave.subscribe(channel), ErrorCode.FORBIDDEN, f"SUBSCRIBE, cycle {cycle}")
        await refused(dave.publish(channel, "still here?"), ErrorCode.FORBIDDEN,
                      f"PUBLISH, cycle {cycle}")
        await refused(dave.history(channel, after=0), ErrorCode.FORBIDDEN, f"HISTORY, cycle {cycle}")
        await refused(dave.mark_read(channel, leave.seq, confirm=True), ErrorCode.FORBIDDEN,
                      f"RECEIPT, cycle {cycle}")
        said = await bob.publish(channel, f"after dave left {cycle}")
        # bob's ack came after his message went out to dave's worker (node); dave's
        # answer to a request made now comes after anything it sent dave then.
        await dave.presence(["dave"])
        with pytest.raises(asyncio.TimeoutError):
            extra = await dave.next_message(timeout=0.05)
            pytest.fail(f"cycle {cycle}: dave received {extra!r} (bob's was seq {said.seq}), "
                        "published after he left")


@pytest.mark.parametrize("dave_on", ["replica", "owner"])
async def test_a_membership_change_is_in_effect_where_its_event_is_delivered(relay, dave_on):
    """dave on a worker that does not sequence the group (a replica's), or on the one
    that does: every worker has each change of his membership before his event."""
    several(relay)
    group = owned_by(relay, 0, lambda k: f"group:race{k}")[len("group:"):]
    here = 1 if dave_on == "replica" else 0
    alice = await on_worker(relay, "alice", 0)       # the owner's worker: she changes the group
    dave = await on_worker(relay, "dave", here)      # he joins and leaves
    bob = await on_worker(relay, "bob", here)        # a member beside dave, who speaks on
    await alice.create_group(group, ["bob"])
    async with busy_store(relay, here):
        await changes_of_membership(alice, dave, bob, group, CYCLES)


async def test_a_membership_change_is_in_effect_on_a_node_once_its_event_is_there(nodes):
    """A cluster of two nodes: the group's channel sequenced by n0, dave and bob on
    n1.  n1 has each change of dave's membership before his event."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice")
    dave = await n1.connect("dave")
    bob = await n1.connect("bob")
    await alice.create_group("crossing", ["bob"])      # n0 sequences group:crossing
    await next_event(bob, "created")                   # n1 knows the group
    await changes_of_membership(alice, dave, bob, "crossing", CYCLES // 4)


@pytest.mark.parametrize("store", [("--fsync", "batch"), ("--store", "memory")],
                         ids=["fsync-batch", "store-memory"])
async def test_a_member_handed_a_conversation_on_another_worker_gets_its_join_and_speaks(
        relay_factory, store):
    """Where an event is not held for the disk (``--fsync batch``, ``--store memory``)
    the owner sends it to the other workers as it is sequenced: the hand-off's record
    must precede its join event there, or dave, on another worker, is not yet a member
    when his join event arrives, and never receives it."""
    relay = relay_factory(*store)
    several(relay)
    group = owned_by(relay, 0, lambda k: f"group:desk{k}")[len("group:"):]
    channel = f"group:{group}"
    alice = await on_worker(relay, "alice", 0)
    dave = await on_worker(relay, "dave", 1)
    await alice.create_group(group, [])
    for cycle in range(CYCLES // 4):
        await alice.handoff(group, "dave", note=f"cycle {cycle}")
        await next_event(dave, "join")
        await dave.publish(channel, f"dave {cycle}")
        await alice.remove_members(group, ["dave"])
        await next_event(dave, "leave")
        await refused(dave.publish(channel, "still here?"), ErrorCode.FORBIDDEN,
                      f"PUBLISH, cycle {cycle}")


async def raw_on_worker(relay, user: str, worker: int):
    """A bare connection of ``user``, past WELCOME, on ``worker``."""
    for _ in range(100):
        conn = await open_raw(relay)
        if (await conn.hello(relay.token(user), device="raw")).get("worker", 0) == worker:
            return conn
        conn.close()
    pytest.fail(f"{user}'s connections never reached worker {worker}")


async def messages_until(client: fenghuo.Client, channel: str, event: str) -> list[tuple[int, bytes]]:
    """(seq, payload) of what ``client`` receives of ``channel`` up to its ``event`` event."""
    got = []
    while True:
        try:
            message = await client.next_message(timeout=5)
        except TimeoutError:
            pytest.fail(f"{client.user} never received its {event!r} event; had {got}")
        if message.channel != channel:
            continue
        got.append((message.seq, message.payload))
        if (message.content_type == fenghuo.ContentType.EVENT
                and f'"event":"{event}"'.encode() in message.payload):
            return got


@pytest.mark.parametrize("bob_on", ["one worker", "replica"])
async def test_a_member_added_while_a_message_goes_to_the_disk_gets_it_live_and_by_catch_up(
        relay_factory, bob_on):
    """Under ``--fsync always`` a message is sequenced (its seq counted) at once and
    delivered only once stored.  alice publishes to her group and adds bob in one
    write, so the relay adds him between the two: m's seq is at or below the
    channel's seq when he was added, and m goes out after his devices were
    subscribed.  His join position must agree with that: his online device gets
    m live, so a device of his that catches up from the start must get it too
    (PROTOCOL §6.5: the join position is the last seq *delivered* when he was
    added).  It was ``ch.seq``: m reached the online device and catch-up left
    it out.  On a replica worker the group's record reaches bob's worker at
    once, m only once stored: the same race there."""
    relay = relay_factory("--fsync", "always", workers=1 if bob_on == "one worker" else None)
    here = 0
    if bob_on == "replica":
        several(relay)
        here = 1
    group = owned_by(relay, 0, lambda k: f"group:disk{k}")[len("group:"):]
    channel = f"group:{group}"
    alice = await raw_on_worker(relay, "alice", 0)     # where the group is sequenced
    alice.write(encode_json(FrameType.GROUP, {"op": "create", "group": group, "members": []}, 2))
    # Her RESULT and her "created" event (seq 1), in either order: delivered, so
    # before bob's join position.
    got = {(f.type, f.request_id) for f in [await alice.frame(), await alice.frame()]}
    assert got == {(FrameType.RESULT, 2), (FrameType.MESSAGE, 0)}, got
    bob = await (on_worker(relay, "bob", here) if bob_on == "replica" else relay.connect("bob"))
    # One write, read at once: m is sequenced, and bob added, before m is stored.
    alice.write(encode_publish(channel, b"m", request_id=3)
                + encode_json(FrameType.GROUP, {"op": "add", "group": group, "users": ["bob"]}, 4))
    live = await messages_until(bob, channel, "join")
    assert live[-1][0] == 3 and live[:-1] in ([], [(2, b"m")]), live
    # A device of bob's that wants everything since he joined: the same messages.
    laptop = await relay.client("bob", device="laptop", sync_from_start=True).connect()
    assert await messages_until(laptop, channel, "join") == live
    # m was on its way to the disk as bob was added: after his join, he got it.
    assert live[:-1] == [(2, b"m")], live
    alice.close()
