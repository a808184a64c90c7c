"""Several workers (``fenghuo serve --workers N``) behave as one relay.

Real supervisor, real worker processes sharing the port and the store; the
kernel decides which worker a connection lands on, WELCOME says which.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import RelayProcess, start_relay
from rawwire import worker_pid
from fenghuo.core import ContentType
from fenghuo.server.routing import owner_of

import fenghuo
from bench.targets import Fenghuo, free_ports, wait_healthy
from fenghuo.channels import direct_channel

WORKERS = 3
SECRET = "workers-test-secret-of-32-bytes-or-more"


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's live children (its workers), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if int(ppid) == supervisor and state != "Z":
                pids.add(int(entry.name))
    return pids


def worker_gauge(relay: RelayProcess, worker: int, name: str) -> float:
    """A gauge from worker ``worker``'s own /metrics."""
    url = f"http://127.0.0.1:{relay.metrics_port + 1 + worker}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def listening(relay: RelayProcess) -> int:
    """How many times a worker has announced it is listening (restarts included)."""
    return relay.log_path.read_text().count(f" of {WORKERS} listening on ")


async def until_presence(client: fenghuo.Client, user: str, online: bool, devices: int) -> None:
    """Wait until ``client``'s worker reports ``user`` so (presence records travel)."""
    expected = {"online": online, "devices": devices}
    deadline = time.monotonic() + 5
    while (await client.presence([user]))[user] != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert (await client.presence([user]))[user] == expected


async def clients_on_every_worker(relay: RelayProcess, users: list[str],
                                  **kwargs) -> dict[str, fenghuo.Client]:
    """Connected clients for ``users``; more connections are tried until every
    worker holds at least one of them (the kernel spreads them at random)."""
    clients: dict[str, fenghuo.Client] = {}
    for user in users:
        clients[user] = await relay.client(user, **kwargs).connect()
    for _ in range(50):
        seen = {c.welcome["worker"] for c in clients.values()}
        if seen == set(range(WORKERS)):
            return clients
        # Reconnect one client from the most crowded worker and hope for another.
        crowded = max(seen, key=lambda w: sum(c.welcome["worker"] == w for c in clients.values()))
        user = next(u for u, c in clients.items() if c.welcome["worker"] == crowded)
        await clients[user].close()
        clients[user] = await relay.client(user, **kwargs).connect()
    pytest.fail(f"connections never reached every worker: {seen}")


def serve_workers(tmp_path: Path, *flags: str):
    """A relay of WORKERS workers, every one listening; stopped gracefully after."""
    relay = start_relay(tmp_path, *flags, workers=WORKERS)
    yield relay
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(30) == 0, relay.log_path.read_text()[-3000:]


@pytest.fixture
def workers_relay(tmp_path):
    yield from serve_workers(tmp_path)


@pytest.fixture
def forgetful_relay(tmp_path):
    # Replicas nobody needs are let go of after a third of a second.
    yield from serve_workers(tmp_path, "--replica-idle", "0.3", "--ping-interval", "1",
                             "--store", "memory")


async def test_a_group_spread_over_workers_gets_every_message_in_one_gap_free_order(workers_relay):
    users = [f"member{i:02d}" for i in range(9)]
    clients = await clients_on_every_worker(workers_relay, users)
    got: dict[str, list] = defaultdict(list)
    for user, client in clients.items():
        client.on_message(lambda m, user=user: got[user].append(m))
    await clients[users[0]].create_group("spread", members=users)

    per_publisher = 40

    async def publish(user: str) -> list[int]:
        return [(await clients[user].publish("group:spread", f"{user} {k}")).seq
                for k in range(per_publisher)]

    acked = await asyncio.gather(*(publish(u) for u in users))
    total = 1 + per_publisher * len(users)        # the "created" event, then every message
    deadline = time.monotonic() + 10
    while any(len(got[u]) < total for u in users) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

    reference = [(m.seq, m.sender, m.payload) for m in got[users[0]]]
    assert [seq for seq, _, _ in reference] == list(range(1, total + 1)), "seqs gap-free"
    for user in users:
        # One order for everybody, whichever worker they are on.
        assert [(m.seq, m.sender, m.payload) for m in got[user]] == reference, user
    assert got[users[0]][0].content_type == ContentType.EVENT     # "created"
    messages = reference[1:]
    for user, seqs in zip(users, acked):
        mine = [seq for seq, sender, _ in messages if sender == user]
        assert seqs == mine, "acks name the seqs the publisher's messages got, in its order"
        payloads = [p for _, sender, p in messages if sender == user]
        assert payloads == [f"{user} {k}".encode() for k in range(per_publisher)]
    for client in clients.values():
        await client.close()


async def test_direct_chat_presence_and_receipts_cross_workers(workers_relay):
    clients = await clients_on_every_worker(workers_relay, ["ann", "cat", "dan"], presence=True)
    ann = clients["ann"]
    # Someone whose chat with ann another worker than ann's sequences.
    bob_name = next(name for name in (f"bob{i}" for i in range(100))
                    if owner_of(direct_channel("ann", name), WORKERS) != ann.welcome["worker"])
    bob = clients[bob_name] = await workers_relay.client(bob_name).connect()
    users = list(clients)
    # Presence records from the other workers may still be on their way.
    for user in users:
        await until_presence(ann, user, True, 1)

    sent = [await ann.send(bob_name, f"hello {k}") for k in range(20)]
    received = [await bob.next_message(timeout=5) for _ in range(20)]
    assert [m.seq for m in received] == [a.seq for a in sent] == list(range(1, 21))
    receipts: list = []
    ann.on_receipt(receipts.append)
    await bob.mark_read(received[-1].channel, received[-1].seq)
    deadline = time.monotonic() + 5
    while not receipts and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert receipts and receipts[0].seq == 20 and receipts[0].user == bob_name
    owner = owner_of(received[-1].channel, WORKERS)
    assert worker_gauge(workers_relay, owner, "fenghuo_remote_origins") >= 1, "ann's publishes went there"
    assert (await bob.unread())[received[-1].channel] == 0

    await bob.close()
    await asyncio.sleep(0.3)
    assert not (await clients["cat"].presence([bob_name]))[bob_name]["online"]
    for user in ("ann", "cat", "dan"):
        await clients[user].close()
    # What owners kept for other workers' connections goes with those connections.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            worker_gauge(workers_relay, w, "fenghuo_remote_origins") for w in range(WORKERS)):
        await asyncio.sleep(0.05)
    for w in range(WORKERS):
        assert worker_gauge(workers_relay, w, "fenghuo_remote_origins") == 0
        assert worker_gauge(workers_relay, w, "fenghuo_forwarded_waiting") == 0


async def test_a_few_thousand_connections_spread_over_the_workers(workers_relay):
    wire = Fenghuo(workers_relay.secret)   # the bench's handshake, without its server
    wire.port = workers_relay.port
    streams = await asyncio.gather(*(wire.connect(f"idle{i:05d}") for i in range(2000)))
    watcher = await workers_relay.client("watcher", presence=True).connect()
    presence = await watcher.presence([f"idle{i:05d}" for i in range(0, 2000, 50)])
    assert all(p["online"] for p in presence.values())
    speaker = await workers_relay.client("speaker").connect()
    await speaker.send("watcher", "still served")
    assert (await watcher.next_message(timeout=5)).payload == b"still served"
    for stream in streams:
        stream.close()
    await watcher.close()
    await speaker.close()


async def test_a_killed_worker_is_restarted_and_no_acked_message_is_lost(workers_relay):
    users = [f"p{i}" for i in range(6)]
    clients = await clients_on_every_worker(workers_relay, users)
    reader = await workers_relay.client("reader").connect()
    await clients[users[0]].create_group("durable", members=[*users, "reader"])
    acked: dict[str, set[int]] = defaultdict(set)
    stop = asyncio.Event()

    async def publish(user: str) -> None:
        k = 0
        while not stop.is_set():
            key = f"{user}-{k}"
            try:
                ack = await asyncio.wait_for(
                    clients[user].publish("group:durable", key, key=key), 10)
            except (TimeoutError, fenghuo.FenghuoError, fenghuo.ConnectionLost):
                await asyncio.sleep(0.05)
                continue          # same key again: the relay answers a repeat with its seq
            acked[user].add(ack.seq)
            k += 1
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(publish(u)) for u in users]
    await asyncio.sleep(1.0)
    acked_before_kill = sum(len(s) for s in acked.values())
    before = worker_pids(workers_relay.proc.pid)
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    after = before
    while (len(after) < WORKERS or victim in after) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        after = worker_pids(workers_relay.proc.pid)
    assert victim not in after and len(after) == WORKERS, "the supervisor restarted the worker"
    while listening(workers_relay) < WORKERS + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*tasks)

    every_ack = set().union(*acked.values())
    assert acked_before_kill > 0 and len(every_ack) > acked_before_kill, "publishing went on"
    assert len(every_ack) == sum(len(s) for s in acked.values()), "no seq acked twice"
    # The history holds every acked message exactly once, in one gap-free order.
    history = []
    after_seq = 0
    while True:
        page = await reader.history("group:durable", after=after_seq, limit=1000)
        if not page:
            break
        history += page
        after_seq = page[-1].seq
    seqs = [m.seq for m in history]
    assert seqs == list(range(1, len(seqs) + 1))
    assert every_ack <= set(seqs)
    keys = [m.payload for m in history if m.content_type != ContentType.EVENT]
    assert len(keys) == len(set(keys)), "no message stored twice"
    for client in [*clients.values(), reader]:
        await client.close()


async def test_a_users_devices_on_every_worker_add_up_for_a_watcher(workers_relay):
    watcher = await workers_relay.connect("watcher", presence=True)
    bobs: list[fenghuo.Client] = []
    while {b.welcome["worker"] for b in bobs} != set(range(WORKERS)) and len(bobs) < 40:
        bobs.append(await workers_relay.connect("bob"))
    assert {b.welcome["worker"] for b in bobs} == set(range(WORKERS))
    await until_presence(watcher, "bob", True, len(bobs))
    # Every count the watcher's worker keeps of the others is exact, down to none.
    while bobs:
        await bobs.pop().close()
        await until_presence(watcher, "bob", bool(bobs), len(bobs))
    await watcher.close()


async def test_users_of_a_killed_worker_go_offline_for_watchers_on_the_others(workers_relay):
    users = [f"r{i}" for i in range(WORKERS)]
    clients = await clients_on_every_worker(workers_relay, users, reconnect=False)
    watcher = await workers_relay.connect("watcher", presence=True)
    victim = next(w for w in range(WORKERS) if w != watcher.welcome["worker"])
    gone = {u for u, c in clients.items() if c.welcome["worker"] == victim}
    for user in users:
        await until_presence(watcher, user, True, 1)
    events: list[dict] = []
    watcher.on_presence(events.append)
    await watcher.watch_presence(users)

    os.kill(worker_pid(workers_relay, victim), signal.SIGKILL)
    # Nobody told the others that its devices left; its successor's first
    # record says it restarted, and they forget what it held.
    deadline = time.monotonic() + 15
    while {e["user"] for e in events if not e["online"]} != gone and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert {e["user"] for e in events if not e["online"]} == gone
    presence = await watcher.presence(users)
    assert {u for u, p in presence.items() if p["online"]} == set(users) - gone
    while listening(workers_relay) < WORKERS + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for client in [*clients.values(), watcher]:
        await client.close()


# ---------------------------------------------------------------- interest
# A worker receives a channel's messages only once one of its sessions needs
# the channel, and a session that needs it there first gets what it missed.


async def connect_on(relay: RelayProcess, user: str, workers: set[int],
                     **kwargs) -> fenghuo.Client:
    """``user`` connected to one of ``workers`` (the kernel picks; retry until it does)."""
    for _ in range(60):
        client = await relay.client(user, **kwargs).connect()
        if client.welcome["worker"] in workers:
            return client
        await client.close()
    pytest.fail(f"{user} never landed on a worker of {workers}")


def name_owned_by(prefix: str, worker: int, channel=lambda name: name) -> str:
    """The first ``prefix<k>`` whose channel ``channel(name)`` worker ``worker`` owns."""
    return next(name for name in (f"{prefix}{k}" for k in range(1000))
                if owner_of(channel(name), WORKERS) == worker)


async def group_owned_by_the_worker_of(relay: RelayProcess, user: str, prefix: str,
                                       members: list[str]) -> tuple[fenghuo.Client, int, str]:
    """``user`` connected, and a group it created that its own worker owns."""
    client = await relay.client(user).connect()
    here = client.welcome["worker"]
    group = name_owned_by(prefix, here, lambda name: f"group:{name}")
    await client.create_group(group, members=[user, *members])
    return client, here, group


async def test_a_direct_chat_reaches_only_the_workers_its_participants_are_on(workers_relay):
    ann = await workers_relay.client("ann").connect()
    here = ann.welcome["worker"]
    # A partner whose chat with ann ann's worker owns, connected on another worker:
    # the third worker has no part in the chat.
    bob_name = name_owned_by("bob", here, lambda name: direct_channel("ann", name))
    bob = await connect_on(workers_relay, bob_name, set(range(WORKERS)) - {here})
    third = (set(range(WORKERS)) - {here, bob.welcome["worker"]}).pop()

    sent = [await ann.send(bob_name, f"hello {k}") for k in range(20)]
    received = [await bob.next_message(timeout=5) for _ in range(20)]
    assert [m.seq for m in received] == [a.seq for a in sent] == list(range(1, 21))
    reply = await bob.send("ann", "hi ann")
    assert reply.seq == 21
    # ann is a participant too: her own messages come back to her, then bob's.
    assert [(await ann.next_message(timeout=5)).seq for _ in range(21)] == list(range(1, 22))
    # So is bob: his own reply reaching him means his worker's replica has it
    # (reading the count before raced the owner's record to that worker).
    assert (await bob.next_message(timeout=5)).seq == 21

    def replicated(worker: int) -> float:
        return worker_gauge(workers_relay, worker, "fenghuo_replica_messages_total")
    # Every message once, through the mesh; but a replica made after the
    # owner stored the first message reads it from the store (the shared
    # SQLite file) and skips the owner's copy of it (seen once under load).
    assert 20 <= replicated(bob.welcome["worker"]) <= 21, "bob's worker got every message once"
    assert replicated(third) == 0, "the worker with no participant got none"
    assert worker_gauge(workers_relay, third, "fenghuo_replica_channels") == 0
    await ann.close()
    await bob.close()


def mesh_records(relay: RelayProcess, worker: int, handling: str) -> float:
    return worker_gauge(relay, worker, f'fenghuo_mesh_records_total{{handling="{handling}"}}')


async def test_message_records_between_workers_are_handled_in_c_not_per_record_in_python(
        workers_relay):
    # ann on one worker publishes to her chat with bob, which a second worker
    # owns (P records to it, sequenced there; A records back with the acks),
    # bob on the third (M records to his replica, and to ann's): no worker
    # hands those records to Python.
    ann = await workers_relay.client("ann").connect()
    here = ann.welcome["worker"]
    owner = (here + 1) % WORKERS
    third = (here + 2) % WORKERS
    bob_name = name_owned_by("bob", owner, lambda name: direct_channel("ann", name))
    bob = await connect_on(workers_relay, bob_name, {third})
    await ann.send(bob_name, "warm up")            # interest, warm: control records
    assert (await bob.next_message(timeout=5)).seq == 1
    before = {(w, h): mesh_records(workers_relay, w, h)
              for w in range(WORKERS) for h in ("compiled", "handed_over")}

    count = 200
    acks = await asyncio.gather(*(ann.send(bob_name, f"m{k}") for k in range(count)))
    received = [await bob.next_message(timeout=5) for _ in range(count)]
    assert sorted(a.seq for a in acks) == [m.seq for m in received] == list(range(2, count + 2))
    assert sorted(m.payload for m in received) == sorted(f"m{k}".encode() for k in range(count))

    def grew(worker: int, handling: str) -> float:
        return mesh_records(workers_relay, worker, handling) - before[worker, handling]
    assert grew(owner, "compiled") >= count, "the owner sequenced the forwarded publishes in C"
    assert grew(third, "compiled") >= count, "bob's worker applied the messages in C"
    assert grew(here, "compiled") >= 2 * count, "ann's worker took the acks and messages in C"
    for worker in range(WORKERS):
        assert grew(worker, "handed_over") < count // 4, "no Python call per message record"
    await ann.close()
    await bob.close()


async def test_a_session_on_a_worker_new_to_its_group_gets_what_it_missed_then_live(workers_relay):
    # The group's owner is the speaker's worker; the late member lands on another,
    # which has never received the group's messages.
    speaker, here, group = await group_owned_by_the_worker_of(
        workers_relay, "speaker", "late", ["member"])
    early = [(await speaker.publish(f"group:{group}", f"early {k}")).seq for k in range(5)]
    assert early == [2, 3, 4, 5, 6]                         # after the "created" event

    member = await connect_on(workers_relay, "member", set(range(WORKERS)) - {here},
                              sync_from_start=True)
    assert member.welcome["channels"][f"group:{group}"] == 6, "WELCOME has the owner's head"
    caught_up = [await member.next_message(timeout=5) for _ in range(6)]
    assert [m.seq for m in caught_up] == [1, 2, 3, 4, 5, 6]
    assert [m.payload for m in caught_up[1:]] == [f"early {k}".encode() for k in range(5)]
    live = [(await speaker.publish(f"group:{group}", f"live {k}")).seq for k in range(5)]
    got = [await member.next_message(timeout=5) for _ in range(5)]
    assert [m.seq for m in got] == live == [7, 8, 9, 10, 11]
    await speaker.close()
    await member.close()


async def test_a_member_added_on_a_worker_new_to_the_group_gets_nothing_from_before(workers_relay):
    owner_client, here, group = await group_owned_by_the_worker_of(
        workers_relay, "boss", "added", [])
    newcomer = await connect_on(workers_relay, "newcomer", set(range(WORKERS)) - {here})
    for k in range(5):
        await owner_client.publish(f"group:{group}", f"before {k}")
    await owner_client.add_members(group, ["newcomer"])
    after = await owner_client.publish(f"group:{group}", "after")
    first = await newcomer.next_message(timeout=5)
    assert first.content_type == ContentType.EVENT and b'"join"' in first.payload
    second = await newcomer.next_message(timeout=5)
    assert (second.seq, second.payload) == (after.seq, b"after")
    assert first.seq == after.seq - 1
    await owner_client.close()
    await newcomer.close()


async def test_history_and_subscribe_on_a_worker_new_to_an_org_channel(workers_relay):
    channel = name_owned_by("org.acme.region", 0)
    head_office = await connect_on(workers_relay, "hq", {0}, channels=(channel,))
    for k in range(4):
        await head_office.publish(channel, f"notice {k}")
    reader = await connect_on(workers_relay, "store1", {1, 2}, channels=(channel,))
    page = await reader.history(channel, after=0, limit=10)
    assert [m.payload for m in page] == [f"notice {k}".encode() for k in range(4)]
    other = await connect_on(workers_relay, "store2", {1, 2} - {reader.welcome["worker"]},
                             channels=(channel,))
    result = await other.subscribe(channel)
    assert result["channels"][channel] == 4
    live = await head_office.publish(channel, "notice 4")
    got = await other.next_message(timeout=5)
    assert (got.seq, got.payload) == (live.seq, b"notice 4") == (5, b"notice 4")
    for client in (head_office, reader, other):
        await client.close()


async def test_a_worker_lets_go_of_a_chat_nobody_there_needs_and_asks_again_later(forgetful_relay):
    relay = forgetful_relay
    ann = await relay.client("ann").connect()
    here = ann.welcome["worker"]
    bob_name = name_owned_by("bob", here, lambda name: direct_channel("ann", name))
    away = set(range(WORKERS)) - {here}
    bob = await connect_on(relay, bob_name, away, sync_from_start=True)
    there = bob.welcome["worker"]
    chat = direct_channel("ann", bob_name)
    for k in range(3):
        await ann.send(bob_name, f"first {k}")
    assert [(await bob.next_message(timeout=5)).seq for _ in range(3)] == [1, 2, 3]
    assert worker_gauge(relay, there, "fenghuo_replica_channels") == 1
    await bob.close()

    # Nobody on bob's worker needs the chat now: after --replica-idle it is let go.
    deadline = time.monotonic() + 10
    while worker_gauge(relay, there, "fenghuo_replica_channels") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert worker_gauge(relay, there, "fenghuo_replica_channels") == 0
    received = worker_gauge(relay, there, "fenghuo_replica_messages_total")
    for k in range(3):
        await ann.send(bob_name, f"while away {k}")
    await asyncio.sleep(0.3)
    assert worker_gauge(relay, there, "fenghuo_replica_messages_total") == received, \
        "messages no longer go to a worker that let the chat go"

    # Back on that worker: asked again, the owner's whole ring comes back, then live.
    bob = await connect_on(relay, bob_name, {there}, sync_from_start=True)
    assert bob.welcome["channels"][chat] == 6
    missed = [await bob.next_message(timeout=5) for _ in range(6)]
    assert [m.seq for m in missed] == [1, 2, 3, 4, 5, 6]
    live = await ann.send(bob_name, "welcome back")
    got = await bob.next_message(timeout=5)
    assert (got.seq, got.payload) == (live.seq, b"welcome back") == (7, b"welcome back")
    await ann.close()
    await bob.close()


def serve(tmp_path: Path, *flags: str) -> subprocess.Popen:
    """``fenghuo serve --workers WORKERS`` with ``flags``, its output in ``tmp_path/serve.log``."""
    with open(tmp_path / "serve.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fenghuo", "serve", "--workers", str(WORKERS),
             "--data-dir", str(tmp_path / "data"), f"--secret={SECRET}", *flags],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def test_port_0_is_one_port_that_every_worker_accepts_on(tmp_path):
    metrics = free_ports(WORKERS + 1)
    proc = serve(tmp_path, "--port", "0", "--metrics-port", str(metrics))
    relay = RelayProcess(proc, "127.0.0.1", 0, metrics, SECRET, tmp_path / "data",
                         tmp_path / "serve.log", WORKERS)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{metrics}/healthz")
        # The supervisor resolved it once and says which; every worker took it.
        printed = re.search(rf"fenghuo supervising {WORKERS} workers on 127\.0\.0\.1:(\d+), "
                            rf"metrics on :{metrics}\n", relay.log())
        assert printed, relay.log()
        relay.port = int(printed.group(1))
        assert relay.port != 0
        listening_on = re.findall(rf"fenghuo worker \d of {WORKERS} listening on 127\.0\.0\.1:(\d+)",
                                  relay.log())
        assert listening_on == [str(relay.port)] * WORKERS
        clients = await clients_on_every_worker(relay, ["ann", "bob", "cat"])
        await clients["ann"].send("bob", "through port 0")
        assert (await clients["bob"].next_message(timeout=5)).text == "through port 0"
        for client in clients.values():
            await client.close()
    finally:
        assert relay.stop() == 0, relay.log()


def test_a_busy_port_stops_the_supervisor_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = serve(tmp_path, "--port", str(taken.getsockname()[1]), "--metrics-port", "0")
        assert proc.wait(15) == 1
    log = (tmp_path / "serve.log").read_text()
    assert "cannot listen on 127.0.0.1:" in log and "worker started" not in log, log


async def test_publishes_forwarded_to_another_worker_are_kept_off_the_cyclic_collector(workers_relay):
    # Each publish to a channel another worker owns keeps its place in the
    # reply order (a Reply) and its wait for the owner's answer (an
    # AwaitedAnswer) until the owner's ACK is back.  Neither is tracked by the
    # cyclic collector now (core/hub.pyx, core/mesh.pyx): the AwaitedAnswer
    # not at all, so it no longer counts towards a young collection (CPython
    # starts one per 700 tracked allocations), the Reply from its making, so
    # the collections its allocation still starts find nothing to traverse.
    # Before: one young collection per 350 publishes in flight, each
    # traversing the hundreds made since (bench/README.md "The latency
    # tail").  The owner is stopped while ann publishes: all are in flight.
    ann = await workers_relay.client("ann").connect()
    here = ann.welcome["worker"]
    owner = (here + 1) % WORKERS
    peer = name_owned_by("offline", owner, lambda name: direct_channel("ann", name))
    await ann.send(peer, "warm up")
    young, received = 'fenghuo_gc_pause_seconds_count{generation="0"}', "fenghuo_frames_received_total"
    before = worker_gauge(workers_relay, here, young)
    frames = worker_gauge(workers_relay, here, received)
    count = 10_000
    pid = worker_pid(workers_relay, owner)
    os.kill(pid, signal.SIGSTOP)
    try:
        sends = asyncio.gather(*(ann.send(peer, f"m{k}") for k in range(count)))
        deadline = time.monotonic() + 20
        while worker_gauge(workers_relay, here, received) < frames + count:
            assert time.monotonic() < deadline, "ann's worker did not read every publish"
            await asyncio.sleep(0.05)
        in_flight = worker_gauge(workers_relay, here, young) - before
    finally:
        os.kill(pid, signal.SIGCONT)
    acks = await sends
    assert sorted(a.seq for a in acks) == list(range(2, count + 2))
    assert in_flight < count / 500, f"{in_flight} young collections with {count} publishes in flight"
    await ann.close()


async def test_an_owner_with_no_subscriber_of_its_own_still_times_what_it_sequences(
        workers_relay):
    ann = await workers_relay.client("ann").connect()
    # A chat another worker owns, with nobody connected there: the ack and
    # the message leave the owner through the mesh alone.
    peer = next(name for name in (f"offline{i}" for i in range(100))
                if owner_of(direct_channel("ann", name), WORKERS) != ann.welcome["worker"])
    owner = owner_of(direct_channel("ann", peer), WORKERS)
    name = "fenghuo_publish_to_deliver_seconds_count"
    before = worker_gauge(workers_relay, owner, name)
    for k in range(3):
        await ann.send(peer, f"into the void {k}")
    deadline = time.monotonic() + 5
    while worker_gauge(workers_relay, owner, name) < before + 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert worker_gauge(workers_relay, owner, name) == before + 3
    await ann.close()
