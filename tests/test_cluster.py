"""A fenghuo cluster over NATS JetStream (docs/DESIGN.md, Cluster).

Real processes only: three nats-servers with JetStream on loopback
(``scripts/nats_cluster.py``) and fenghuo nodes started as a user starts them.
"""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors

from scripts.nats_cluster import NatsCluster


async def test_nats_cluster_keeps_an_r3_stream_through_a_server_kill(nats_cluster: NatsCluster):
    """The fixture's servers form one JetStream cluster: a replicated stream
    written through one server is read through another after the first is killed."""
    nc = await nats.connect(nats_cluster.urls[0])
    js = nc.jetstream()
    await js.add_stream(name="FIXTURE", subjects=["fixture.>"], num_replicas=3)
    ack = await js.publish("fixture.a", b"kept")
    await nc.close()
    nats_cluster.servers[0].kill()
    nc = await nats.connect(nats_cluster.urls[1])
    try:
        # If the killed server led the stream, the other two elect a leader
        # first (a few seconds at most); reads fail meanwhile.
        deadline = time.monotonic() + 15
        while True:
            try:
                msg = await nc.jetstream().get_msg("FIXTURE", seq=ack.seq)
                break
            except nats.errors.Error:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert msg.data == b"kept"
    finally:
        await nc.close()


def test_nats_cluster_stop_ends_every_server(tmp_path):
    cluster = NatsCluster.start()
    procs = [s.proc for s in cluster.servers]
    base = cluster.base
    assert all(p is not None and p.poll() is None for p in procs)
    cluster.stop()
    assert all(p is not None and p.poll() is not None for p in procs)
    assert not base.exists()
