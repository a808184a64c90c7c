"""A cluster node's start while JetStream cannot answer it (server/jetstream.py,
Engine.patiently): it keeps trying, says what it waits for and why, and comes up
once JetStream answers.  Real nats-servers and a real node process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conftest import start_relay
from scripts.nats_cluster import NatsCluster


def _waits(tmp_path: Path) -> list[dict]:
    """The node's log lines that name what its start waits for."""
    return [json.loads(line) for path in tmp_path.glob("relay-*.log")
            for line in path.read_text(errors="replace").splitlines()
            if '"waiting_for"' in line]


async def test_a_node_without_a_jetstream_meta_leader_says_what_it_waits_for_then_comes_up(
        tmp_path: Path, nats_cluster: NatsCluster):
    """Two of the three nats-servers down: JetStream has no meta leader, and the
    node's first request (its stream) is answered 503 or not at all.  The node
    does not listen; its log names the stream and the error, try after try; with
    the servers back it makes the stream and buckets and listens."""
    for server in nats_cluster.servers[1:]:
        server.kill()
    starting = asyncio.ensure_future(asyncio.to_thread(
        start_relay, tmp_path, "--cluster", nats_cluster.urls[0], "--node", "n1",
        workers=1, timeout=120))
    for _ in range(150):
        if len(waits := _waits(tmp_path)) >= 2:
            break
        assert not starting.done(), "the node listened without JetStream"
        await asyncio.sleep(0.2)
    else:
        pytest.fail("30 s and the node's log never said what it waits for")
    assert {w["waiting_for"] for w in waits} == {"stream FENGHUO"}
    assert any("JetStream system temporarily unavailable" in w.get("error", "")
               or w["msg"] == "still waiting for JetStream" for w in waits)
    await asyncio.to_thread(nats_cluster.restart)
    relay = await starting
    try:
        assert '"joined the cluster"' in relay.log()
    finally:
        relay.stop()
