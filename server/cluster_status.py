"""``fenghuo cluster status``: what each node of a cluster owns, and whether it is alive.

Read from the engine, as the nodes themselves know it, with no node's help
(a dead node cannot answer its ``/healthz``): the nodes' names from the
``fenghuo_meta`` bucket (``index.<k>``), every channel's claim from
``fenghuo_owners``, and liveness from the heartbeats on ``fh.heartbeat``,
listened to for one lease (a node sends one every third of its lease, so a
live node is heard about three times).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import orjson

from fenghuo.server.jetstream import META, OWNERS, channel_of, present_entries
from fenghuo.server.nodes import HEARTBEAT
from fenghuo.server.ownership import parse_claim

# Seconds to reach NATS before giving up (the CLI reports it in one line).
CONNECT_TIMEOUT = 5.0


@dataclass
class NodeStatus:
    """One node as the cluster's engine knows it."""

    name: str
    index: int
    alive: bool = False                   # heard within the lease
    region: str = ""                      # from its heartbeat ("" when not heard)
    #: channels it holds the claim of -> that claim's epoch
    channels: dict[str, int] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "alive": self.alive,
                "region": self.region, "owned": len(self.channels), "channels": self.channels}


@dataclass
class ClusterStatus:
    cluster_id: str
    lease: float
    nodes: list[NodeStatus]

    def json(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "lease": self.lease,
                "nodes": [n.json() for n in self.nodes]}

    def text(self, channels: bool) -> str:
        alive = sum(n.alive for n in self.nodes)
        lines = [f"cluster {self.cluster_id}: {len(self.nodes)} nodes, {alive} alive "
                 f"(heard within {self.lease:g} s)",
                 f"{'node':<16} {'index':>5} {'region':<12} {'alive':<5} {'owns':>6}"]
        for n in self.nodes:
            lines.append(f"{n.name:<16} {n.index:>5} {n.region or '-':<12} "
                         f"{'yes' if n.alive else 'NO':<5} {len(n.channels):>6}")
        dead = [n for n in self.nodes if not n.alive and n.channels]
        if dead:
            lines.append("channels of a node not alive are claimed by the next live node "
                         "that needs them")
        if channels:
            for n in self.nodes:
                for name, epoch in sorted(n.channels.items()):
                    lines.append(f"  {name}  {n.name}  epoch {epoch}")
        return "\n".join(lines)


class Unreadable(ConnectionError):
    """NATS could not be reached, or holds no fenghuo cluster."""


async def read(urls: list[str], lease: float) -> ClusterStatus:
    """The cluster's state, listening to heartbeats for ``lease`` seconds."""
    try:
        return await _read(urls, lease)
    except nats.errors.Error as exc:
        raise Unreadable(str(exc) or type(exc).__name__) from None


async def _read(urls: list[str], lease: float) -> ClusterStatus:
    async def quiet(exc: Exception) -> None:
        pass                                 # reported once, by the caller

    # max_reconnect_attempts=0 would mean "no limit" to nats-py: one try per server.
    nc = await nats.connect(urls, name="fenghuo-cluster-status", connect_timeout=CONNECT_TIMEOUT,
                            max_reconnect_attempts=1, reconnect_time_wait=0.1,
                            allow_reconnect=False, error_cb=quiet)
    try:
        heard: dict[int, dict[str, Any]] = {}

        async def on_heartbeat(msg: Any) -> None:
            body = orjson.loads(msg.data)
            if body.get("leaving"):
                heard.pop(body["index"], None)
            else:
                heard[body["index"]] = body

        await nc.subscribe(HEARTBEAT, cb=on_heartbeat)
        listening = asyncio.create_task(asyncio.sleep(lease))
        js = nc.jetstream()
        cluster_id, nodes = await _nodes(js)
        await _claims(js, nodes)
        await listening
    finally:
        await nc.close()
    for index, body in heard.items():
        node = nodes.setdefault(index, NodeStatus(body["name"], index))
        node.alive, node.region = True, body["region"]
    return ClusterStatus(cluster_id, lease, sorted(nodes.values(), key=lambda n: n.name))


async def _nodes(js: Any) -> tuple[str, dict[int, NodeStatus]]:
    """The cluster id and every node that ever took an index."""
    nodes: dict[int, NodeStatus] = {}
    cluster_id = ""
    for key, entry in (await present_entries(js, META, CONNECT_TIMEOUT)).items():
        value = bytes(entry.value or b"").decode()
        if key == "cluster-id":
            cluster_id = value
        elif key.startswith("index."):
            index = int(key.removeprefix("index."))
            nodes[index] = NodeStatus(value, index)
    return cluster_id, nodes


async def _claims(js: Any, nodes: dict[int, NodeStatus]) -> None:
    """Each channel's claim, under the node holding it."""
    for key, entry in (await present_entries(js, OWNERS, CONNECT_TIMEOUT)).items():
        claim = parse_claim(entry.value, entry.revision or 0)
        if claim is not None:
            node = nodes.setdefault(claim.node, NodeStatus(f"#{claim.node}", claim.node))
            node.channels[channel_of(key)] = claim.epoch
