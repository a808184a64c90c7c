"""Everything a client or an operator does works on any node of a cluster
(docs/DESIGN.md, Cluster): export, group changes, clicks, big groups.

Real nats-servers and real fenghuo nodes, as tests/test_cluster.py starts them.
"""

from __future__ import annotations

import orjson

from test_cluster import messages_of, nodes  # noqa: F401  (nodes: the fixture)
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
