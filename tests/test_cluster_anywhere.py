"""Everything a client or an operator does works on any node of a cluster
(docs/DESIGN.md, Cluster): export, group changes, clicks, big groups.

Real nats-servers and real fenghuo nodes, as tests/test_cluster.py starts them.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fenghuo.api import AsyncApi
from fenghuo.client import FenghuoError
from fenghuo.core import ErrorCode
from conftest import RelayProcess, start_relay
from test_cluster import LEASE, SECRET, far_link, messages_of, nodes  # noqa: F401  (nodes: the fixture)
from test_status import until
from test_retention_export import run_cli


async def test_export_on_a_node_that_never_saw_the_channels_reads_the_stream(
        nodes, nats_cluster, tmp_path):  # noqa: F811
    """``fenghuo export --cluster`` on a node none of whose clients ever had the
    channels: every message is there (read from the stream), the user's export
    has their chats and groups, and the file verifies."""
    n0, n1 = nodes("n0", "n1")
    alice = await n0.connect("alice", channels=("org.acme.>",))
    await alice.create_group("ops", ["bob"])
    for i in range(12):
        await alice.publish("group:ops", f"g{i}")
        await alice.send("bob", f"d{i}")
    await alice.publish("org.acme.news", "said by alice")
    await alice.send("carol", "not bob's")
    urls = ",".join(nats_cluster.urls)
    out = tmp_path / "ops.jsonl"
    # n1's own data dir (its key file, its SQLite): no message of these is there.
    base = ("export", "--data-dir", str(n1.data_dir), "--cluster", urls)
    run = run_cli(*base, "--channel", "group:ops", "--out", str(out))
    assert run.returncode == 0, run.stderr
    *lines, last, _signature = out.read_bytes().splitlines()
    messages = [orjson.loads(line) for line in lines]
    assert [m["seq"] for m in messages] == list(range(1, 14))       # the created event, then 12
    assert [m["text"] for m in messages[1:]] == [f"g{i}" for i in range(12)]
    assert orjson.loads(last)["summary"]["channels"] == {
        "group:ops": {"first": 1, "last": 13, "count": 13, "contiguous": True}}
    assert run_cli("export", "--data-dir", str(n1.data_dir), "--verify", str(out)).returncode == 0

    user = tmp_path / "alice.jsonl"
    assert run_cli(*base, "--user", "alice", "--out", str(user)).returncode == 0
    summary = orjson.loads(user.read_bytes().splitlines()[-2])["summary"]
    assert set(summary["channels"]) == {"dm:alice:bob", "dm:alice:carol", "group:ops",
                                        "org.acme.news"}
    assert summary["messages"] == 12 + 1 + 13 + 1
    bob = tmp_path / "bob.jsonl"
    assert run_cli(*base, "--user", "bob", "--out", str(bob)).returncode == 0
    summary = orjson.loads(bob.read_bytes().splitlines()[-2])["summary"]
    assert set(summary["channels"]) == {"dm:alice:bob", "group:ops"}  # not what alice said in org

    refused = run_cli(*base, "--channel", "group:ops", "--status")
    assert refused.returncode == 2 and "not built for --cluster" in refused.stderr
    unreachable = run_cli("export", "--data-dir", str(n1.data_dir), "--cluster",
                          "nats://127.0.0.1:1", "--channel", "group:ops")
    assert unreachable.returncode == 1
    assert "cannot read the cluster's stream" in unreachable.stderr


async def test_a_member_added_on_another_node_may_publish_at_once(nodes, nats_cluster):  # noqa: F811
    """Bob's node is 150 ms from NATS, so it learns a group change of alice's
    node a NATS hop after alice has her answer.  Bob publishing on being told
    (here: at once) is not refused NOT_FOUND (a new group) nor FORBIDDEN (just
    added): his node reads the group from its bucket before refusing."""
    server = nats_cluster.servers[0]
    with far_link(server) as url:
        (n0,) = nodes("n0", servers=[server])
        (n1,) = nodes("n1", urls=[url])
        alice = await n0.connect("alice")
        bob = await n1.connect("bob")
        created = await alice.create_group("fresh", ["bob"])
        ack = await bob.publish("group:fresh", "at once")
        assert ack.seq == created["seq"] + 1
        await alice.create_group("later", [])
        page: list = []
        while not page:                     # n1 knows "later" (without bob) once its event is there
            await asyncio.sleep(0.2)
            page = await n1_history(n1, "group:later")
        await alice.add_members("later", ["bob"])
        ack = await bob.publish("group:later", "just added")
        assert ack.seq == page[-1].seq + 2          # after the "added" event
        # Still refused for whom the bucket does not make a member either.
        carol = await n1.connect("carol")
        with pytest.raises(FenghuoError) as refused:
            await carol.publish("group:later", "not a member")
        assert refused.value.code == ErrorCode.FORBIDDEN
        with pytest.raises(FenghuoError) as refused:
            await carol.publish("group:nowhere", "no such group")
        assert refused.value.code == ErrorCode.NOT_FOUND
        # A name outside the grammar no bucket can mend: refused as it parsed.
        with pytest.raises(FenghuoError) as refused:
            await carol.publish("group:bad name", "outside the grammar")
        assert (refused.value.code, refused.value.message) == (
            ErrorCode.INVALID_CHANNEL, "invalid group id 'bad name'")


async def n1_history(node, channel: str) -> list:
    """``channel``'s history as a member of it on ``node`` reads it (empty while unknown)."""
    ops = await node.connect("alice", reconnect=False)
    try:
        return await ops.history(channel, limit=5)
    except FenghuoError:
        return []
    finally:
        await ops.close()


async def test_a_message_s_clicks_are_the_same_on_every_node(tmp_path, nats_cluster):
    """Clicks made through two nodes: the message's click aggregate (the API's
    message_status) is the same on both and on a node started after them
    (before, each node kept its own and shared it with the nodes alive then)."""
    started: list[RelayProcess] = []

    def node(name: str) -> RelayProcess:
        started.append(start_relay(tmp_path, "--cluster", ",".join(nats_cluster.urls), "--node",
                                   name, "--cluster-lease", LEASE, workers=1, secret=SECRET,
                                   api=True))
        return started[-1]
    try:
        n0, n1 = node("n0"), node("n1")
        alice = await n0.connect("alice")
        await alice.create_group("promo", ["bob", "carol"])
        bob, carol = await n0.connect("bob"), await n1.connect("carol")
        ack = await alice.publish("group:promo", "sale")
        for c in (bob, carol):                           # the sale has reached their nodes
            while (await messages_of(c, "group:promo", 1))[0].seq < ack.seq:
                pass
        assert (await bob.click("group:promo", ack.seq, "offer"))["first"] is True
        assert (await carol.click("group:promo", ack.seq, "map"))["first"] is True
        n2 = node("n2")
        for n in (n0, n1, n2):
            async with AsyncApi(n.api_url, n.api_key) as api:
                async def clicked() -> dict | None:
                    got = await api.message_status("group:promo", ack.seq)
                    return got if got["links"] == {"map": 1, "offer": 1} else None
                got = await until(clicked, f"the clicks on {n.port}")
                assert got["counts"]["clicked"] == 2
    finally:
        await asyncio.gather(*(c.close() for n in started for c in n.clients),
                             return_exceptions=True)
        for n in started:
            n.stop()
