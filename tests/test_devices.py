"""One user's devices (docs/PROTOCOL.md §3.2): a newer connection with the
device id of a live one replaces it (the older gets DEVICE_REPLACED and is
closed), on one worker and across the workers of the default deployment; and
a user's many connections come and go with their device count right."""

from __future__ import annotations

import asyncio
import re

import pytest

from fenghuo import ErrorCode
from fenghuo.client import ConnectionLost
from rawwire import open_raw

DEVICES = 4
TRIES = 40           # with several workers, until one pair has landed on two workers
MANY = 120


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("workers", [1, None], ids=["one-worker", "default-workers"])
async def test_a_newer_connection_of_a_device_replaces_the_older(relay_factory, workers):
    relay = relay_factory(workers=workers)
    bob = await relay.connect("bob")
    crossed = False
    for k in range(TRIES):
        if k >= DEVICES and (relay.workers == 1 or crossed):
            break
        device = f"phone{k}"
        older = await relay.connect("alice", device=device)
        errors = []
        older.on_error(errors.append)
        newer = await relay.connect("alice", device=device)
        crossed = crossed or older.welcome.get("worker") != newer.welcome.get("worker")
        await until(lambda: errors and not older.connected)
        assert [e.code for e in errors] == [ErrorCode.DEVICE_REPLACED], errors
        ack = await bob.send("alice", f"to {device}")
        message = await newer.next_message(timeout=5)
        assert (message.seq, message.payload) == (ack.seq, f"to {device}".encode())
        with pytest.raises(ConnectionLost):     # nothing for it: it is closed for good
            await older.next_message(timeout=1)
        assert not older.connected      # the reference client does not take the device back
        assert (await bob.presence(["alice"]))["alice"]["devices"] == 1
        await newer.close()
        await older.close()
    assert crossed or relay.workers == 1
    # Different devices of one user do not replace each other.
    first = await relay.connect("alice", device="laptop")
    second = await relay.connect("alice", device="tablet")
    await bob.send("alice", "both")
    assert (await first.next_message(timeout=5)).payload == b"both"
    assert (await second.next_message(timeout=5)).payload == b"both"


@pytest.mark.parametrize("workers", [1, None], ids=["one-worker", "default-workers"])
async def test_many_devices_of_one_user_come_and_go(relay_factory, workers):
    relay = relay_factory(workers=workers)
    bob = await relay.connect("bob", presence=True)   # sees alice without a shared channel

    async def devices() -> int:
        return (await bob.presence(["alice"]))["alice"]["devices"]

    clients = await asyncio.gather(*(relay.connect("alice", device=f"d{i}") for i in range(MANY)))
    assert await devices() == MANY
    await bob.send("alice", "all")
    for client in clients:
        assert (await client.next_message(timeout=5)).payload == b"all"
    await asyncio.gather(*(c.close() for c in clients[::2]))
    for _ in range(250):
        if await devices() == MANY // 2:
            break
        await asyncio.sleep(0.02)
    assert await devices() == MANY // 2
    await asyncio.gather(*(c.close() for c in clients[1::2]))
    for _ in range(250):
        if await devices() == 0:
            break
        await asyncio.sleep(0.02)
    assert (await bob.presence(["alice"]))["alice"] == {"online": False, "devices": 0}



@pytest.mark.parametrize("workers", [1, None], ids=["one-worker", "default-workers"])
async def test_a_replacement_never_shows_the_user_offline_to_watchers(relay_factory, workers):
    """PROTOCOL §3.2: the device count does not change when a device replaces its
    older connection. A watcher never sees the user offline for it (across workers,
    the older's worker used to announce 0 devices before the newer was counted),
    and the last event has the count unchanged; on the watcher's worker, exactly one."""
    relay = relay_factory(workers=workers)
    bob = await relay.connect("bob", presence=True)
    events: list[dict] = []
    bob.on_presence(events.append)
    seen = set()
    for k in range(TRIES):
        user = f"alice{k}"
        await bob.watch_presence([user])
        older = await relay.connect(user, device="phone")
        # The last try's users' offline events may still come in after this
        # one's online event (bob still watches them): look at this user's only.
        await until(lambda: any(e["user"] == user for e in events))
        del events[:]
        errors: list = []
        older.on_error(errors.append)
        newer = await relay.connect(user, device="phone")
        await until(lambda: errors and not older.connected)
        await asyncio.sleep(0.3)
        events[:] = [e for e in events if e["user"] == user]
        assert all(e["online"] and e["devices"] >= 1 for e in events), events
        assert not events or events[-1] == {"user": user, "online": True, "devices": 1}, events
        place = (bob.welcome.get("worker"), older.welcome.get("worker"), newer.welcome.get("worker"))
        if place[0] == place[1] == place[2] or place[0] == place[1] != place[2]:
            assert events == [{"user": user, "online": True, "devices": 1}], (place, events)
        seen.add(place[0] == place[1] != place[2])
        await newer.close()
        await older.close()
        if relay.workers == 1 or True in seen:
            break
    assert relay.workers == 1 or True in seen


async def test_a_hello_naming_no_device_gets_one(relay_factory):
    """PROTOCOL §3.2: a HELLO whose ``device`` is missing, null or "" is given
    ``d-`` and 8 hex digits (written in C, core/codec.pyx device_id), one per connection."""
    relay = relay_factory(workers=1)
    given = []
    for extra in ({}, {"device": None}, {"device": ""}, {}, {}):
        conn = await open_raw(relay)
        welcome = await conn.hello(relay.token("alice"), **extra)
        assert re.fullmatch(r"d-[0-9a-f]{8}", welcome["device"]), welcome
        given.append(welcome["device"])
        conn.close()
    assert len(set(given)) == len(given)
    named = await open_raw(relay)
    assert (await named.hello(relay.token("alice"), device="phone"))["device"] == "phone"
    named.close()
