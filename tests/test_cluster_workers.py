"""Cluster nodes of several workers (``fenghuo serve --cluster ... --workers 2``).

Each worker of a node is a participant of the cluster (docs/DESIGN.md,
"Several workers per node"): real nats-servers, real nodes of a supervisor
and two workers each; the kernel decides which worker a connection lands on,
WELCOME's ``worker`` (the participant's index) says which.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

import fenghuo
from scripts.nats_cluster import NatsCluster
from conftest import RelayProcess, start_relay
from test_cluster import LEASE, SECRET, answers, healthz, messages_of, send_while_away
from test_cluster import until as eventually
from test_readme import healthz_fields

WORKERS = 2


def participants(node: RelayProcess) -> dict[int, str]:
    """Participant index -> name of each worker of ``node``, from its workers' /healthz."""
    found = {}
    for k in range(node.workers):
        url = f"http://127.0.0.1:{node.metrics_port + 1 + k}/healthz"
        with urllib.request.urlopen(url, timeout=5) as r:
            state = json.load(r)["cluster"]
        found[state["index"]] = state["node"]
    return found


@pytest.fixture
async def nodes(tmp_path: Path, nats_cluster: NatsCluster):
    """``nodes("n0", "n1")``: nodes of WORKERS workers each; their clients closed
    and the nodes stopped after."""
    started: list[RelayProcess] = []

    def start(*names: str) -> list[RelayProcess]:
        new = [start_relay(tmp_path, "--cluster", ",".join(nats_cluster.urls), "--node", name,
                           "--cluster-lease", LEASE, workers=WORKERS, secret=SECRET)
               for name in names]
        started.extend(new)
        return new

    yield start
    await asyncio.gather(*(c.close() for n in started for c in n.clients), return_exceptions=True)
    for node in started:
        assert "worker exited" not in node.log(), f"a worker died:\n{node.log()[-3000:]}"
        node.stop()


async def on_worker(node: RelayProcess, user: str, worker: int,
                    resume: fenghuo.Client | None = None, **kwargs) -> fenghuo.Client:
    """A connected client of ``user`` on participant ``worker`` of ``node`` (reconnected
    until the kernel puts it there); with the positions and epoch of ``resume``, the
    same device moving there."""
    for _ in range(60):
        client = node.client(user, **kwargs)
        if resume is not None:
            client.positions, client.epoch = dict(resume.positions), resume.epoch
        await client.connect()
        if client.welcome["worker"] == worker:
            return client
        await client.close()
    pytest.fail(f"{user}'s connections never reached worker {worker}")


async def test_messages_have_one_order_with_publishers_on_every_worker_of_every_node(nodes):
    """Two nodes of two workers, a publisher on each of the four workers: group,
    organisation and direct channels each have one gap-free order, the same for
    every receiver, whichever worker of which node sequences them."""
    n0, n1 = nodes("n0", "n1")
    workers = [(node, w) for node in (n0, n1) for w in sorted(participants(node))]
    assert len({w for _, w in workers}) == 4, workers
    users = ["ann", "bob", "cat", "dan"]
    org = "org.acme.ops"
    clients = [await on_worker(node, user, w, channels=(org,))
               for user, (node, w) in zip(users, workers, strict=True)]
    ann, dan = clients[0], clients[3]
    created = await ann.create_group("four", users[1:])
    group = "group:four"
    firsts = {c.user: await messages_of(c, group, 1) for c in clients[1:]}
    per = 8
    dm = "dm:ann:dan"                     # ann on n0, dan on the other node
    await asyncio.gather(*(
        c.publish(name, f"{c.user}-{name}-{i}") for c in clients for i in range(per)
        for name in (group, org)),
        *(c.publish(dm, f"{c.user}-dm-{i}") for c in (ann, dan) for i in range(per)))
    group_total = created["seq"] + 4 * per
    wanted = {group: group_total, org: 4 * per}
    seen = {c.user: await by_channel(c, {**wanted, **({dm: 2 * per} if c in (ann, dan) else {})},
                                     {group: firsts.get(c.user, [])})
            for c in clients}
    for user, got in seen.items():
        assert [s for s, _ in got[group]] == list(range(1, group_total + 1)), user
        assert [s for s, _ in got[org]] == list(range(1, 4 * per + 1)), user
        assert got[group] == seen["ann"][group] and got[org] == seen["ann"][org], user
    assert sorted(p for _, p in seen["ann"][org]) == sorted(
        f"{u}-{org}-{i}".encode() for u in users for i in range(per))
    assert sorted(p for _, p in seen["ann"][group][created["seq"]:]) == sorted(
        f"{u}-{group}-{i}".encode() for u in users for i in range(per))
    for user in ("ann", "dan"):
        assert [s for s, _ in seen[user][dm]] == list(range(1, 2 * per + 1))
    assert seen["ann"][dm] == seen["dan"][dm]


async def by_channel(client: fenghuo.Client, counts: dict[str, int],
                     before: dict[str, list[fenghuo.Message]],
                     timeout: float = 20.0) -> dict[str, list[tuple[int, bytes]]]:
    """``client``'s next messages until each channel of ``counts`` has that many
    (``before``: those already taken), as (seq, payload)s by channel."""
    got = {name: [(m.seq, m.payload) for m in before.get(name, [])] for name in counts}
    deadline = time.monotonic() + timeout
    while any(len(got[name]) < n for name, n in counts.items()):
        message = await client.next_message(timeout=max(0.1, deadline - time.monotonic()))
        if message.channel in got:
            got[message.channel].append((message.seq, message.payload))
    return got


async def test_offline_catch_up_and_history_on_any_worker(nodes):
    """Messages sent while their receiver was away: caught up by position on
    each worker of the other node, and read by HISTORY there."""
    n0, n1 = nodes("n0", "n1")
    w0 = sorted(participants(n0))
    alice = await on_worker(n0, "alice", w0[1])       # not the node's first worker
    bob = await n1.connect("bob")
    await send_while_away(alice, bob)
    for w in sorted(participants(n1)):
        moved = await on_worker(n1, "bob", w, resume=bob)
        got = await messages_of(moved, "dm:alice:bob", 5)
        assert [(m.seq, m.payload) for m in got] == [(i, f"m{i - 1}".encode())
                                                    for i in range(2, 7)], w
        page = await moved.history("dm:alice:bob", limit=10)
        assert [m.seq for m in page] == list(range(1, 7))
        await moved.close()


async def test_presence_across_the_workers_of_every_node(nodes):
    """A user online on any worker of one node is online for watchers on every
    worker of the other, and offline for all once gone."""
    n0, n1 = nodes("n0", "n1")
    watchers = [await on_worker(n0, "ops", w, presence=True) for w in sorted(participants(n0))]
    for w in sorted(participants(n1)):
        bob = await on_worker(n1, "bob", w, reconnect=False)
        for ops in watchers:
            await until(ops, "bob", True)
        await bob.close()
        for ops in watchers:
            await until(ops, "bob", False)


async def until(client: fenghuo.Client, user: str, online: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.presence([user]))[user]["online"] != online:
        assert time.monotonic() < deadline, f"{user} never {'on' if online else 'off'}line"
        await asyncio.sleep(0.05)


async def test_schedule_on_a_node_s_second_worker_fires_once(nodes):
    """SCHEDULE on a worker without the node's timers goes to its worker 0 (not to
    the cluster's participant 0): the message is published once at its time."""
    (n0,) = nodes("n0")
    w = sorted(participants(n0))
    second = next(i for i, name in participants(n0).items() if name == "n0/1")
    assert second in w
    alice = await on_worker(n0, "alice", second)
    bob = await n0.connect("bob")
    scheduled = await alice.schedule("dm:alice:bob", "later", time.time() + 1.0)
    assert not scheduled.duplicate
    got = await messages_of(bob, "dm:alice:bob", 1, timeout=15)
    assert got[0].payload == b"later"
    # Listed until stored, a moment after its delivery (PROTOCOL §3.17a).
    deadline = time.monotonic() + 5
    while await alice.scheduled() != []:
        assert time.monotonic() < deadline, "the fired message stayed listed"
        await asyncio.sleep(0.05)


async def test_the_supervisor_s_healthz_and_metrics_show_every_worker_s_cluster_state(nodes):
    """The node's /healthz (the supervisor's, on the metrics port) has each worker's
    ``cluster`` object and the node's (engine connected: every worker is), and its
    /metrics every worker's ``fenghuo_cluster_*`` samples."""
    (n0,) = nodes("n0")
    alice = await n0.connect("alice")
    await alice.publish("dm:alice:bob", "hello")        # some worker owns a channel now
    base = f"http://127.0.0.1:{n0.metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
        health = json.load(r)
    assert health["status"] == "ok"
    by_worker = {w["index"]: w["cluster"] for w in health["workers"]}
    assert sorted(c["node"] for c in by_worker.values()) == ["n0/0", "n0/1"]
    assert all(c["engine_connected"] for c in by_worker.values()), by_worker
    assert {c["index"]: c["node"] for c in by_worker.values()} == participants(n0)
    node = health["cluster"]
    assert node["engine_connected"] is True
    assert node["participants"] == ["n0/0", "n0/1"]
    assert node["channels_owned"] == sum(c["channels_owned"] for c in by_worker.values()) >= 1
    # Every field the README's /healthz table lists, and no other.
    documented = healthz_fields()
    assert set(health) == documented["supervisor"], health
    assert all(set(w) == documented["worker"] for w in health["workers"]), health["workers"]
    assert set(node) == documented["node"], node
    assert all(set(c) == documented["cluster"] for c in by_worker.values()), by_worker
    assert set(healthz(n0.metrics_port + 1)[1]) == documented["relay"]     # worker 0's own
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in ("fenghuo_cluster_engine_connected", "fenghuo_cluster_channels_owned",
                 "fenghuo_cluster_failovers_total", "fenghuo_cluster_forwarded_publishes_total",
                 "fenghuo_cluster_replica_lag_seconds_count"):
        for k in range(WORKERS):
            assert any(line.startswith(f'{name}{{worker="{k}"') for line in text.splitlines()), \
                (name, k)
    for k in range(WORKERS):
        assert f'fenghuo_cluster_engine_connected{{worker="{k}"}} 1.0' in text, k


async def test_the_supervisor_s_healthz_is_503_degraded_while_its_workers_engine_is_away(
        nodes, nats_cluster: NatsCluster):
    """kill -9 of every nats-server: each worker's /healthz answers 503 "degraded",
    so the node's (the supervisor's) does too, with each worker's ``cluster``
    object kept (engine not connected) and the node's; 200 "ok" again once
    every worker has reconnected."""
    (n0,) = nodes("n0")
    assert (await answers(n0.metrics_port, 200))["status"] == "ok"
    for server in nats_cluster.servers:
        server.kill()
    async def every_worker_away() -> dict | None:
        code, body = healthz(n0.metrics_port)      # the workers see it at their own moments
        return body if code == 503 and all(
            w.get("cluster", {}).get("engine_connected") is False for w in body["workers"]) \
            else None
    health = await eventually(every_worker_away, 30)
    assert (health["status"], health["cluster"]["engine_connected"]) == ("degraded", False)
    assert [(w["running"], w["healthy"], w["cluster"]["engine_connected"])
            for w in health["workers"]] == [(True, False, False)] * WORKERS
    nats_cluster.restart()
    health = await answers(n0.metrics_port, 200)
    assert (health["status"], health["cluster"]["engine_connected"]) == ("ok", True)
