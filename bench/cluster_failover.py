"""``python -m bench cluster --parts failover``: ``kill -9`` under load, counted.

Each event runs on a fresh cluster (``bench.cluster.FenghuoCluster``: three
nats-servers, three nodes).  A client on node 0 makes the group ``busy``, so
node 0 sequences it.  Two publishers, on nodes 1 and 2, publish to it at a
fixed rate, each message with an idempotency key of its own and its first
send time in the payload, retrying under the same key when a cluster says
"retry" (ERROR ``INTERNAL`` or ``REQUEST_TIMEOUT``, PROTOCOL §4), as a
client should.  Receivers: one on each of the three nodes.  After
``--failover-before`` seconds the victim is killed with SIGKILL:

* ``node``: the fenghuo node that owns ``busy`` (node 0).  Its receiver's
  device moves to node 1 with its positions and epoch, as a client's
  reconnect to another node does, and resumes by position.
* ``nats``: the nats-server that leads the JetStream stream ``FENGHUO``
  (the one every append goes through).

Load goes on ``--failover-after`` seconds, then every publish is awaited
until acked and the stream is read back through history.  Reported:

* lost: acked messages the stream does not hold (read from JetStream
  itself; must be 0); acked messages a receiver never got (must be 0);
  acked messages HISTORY on node 1 does not serve (a non-owner serves what
  reached its replica: DESIGN, Cluster, limits);
* duplicates at the app: a key received twice by a receiver, or stored
  twice (must be 0); the stored seqs gap-free;
* time until the channel is sequenced again: from the kill to the first
  ack of a publish first sent after it (only a live owner can give one);
  for the nats-server, also the time until the stream has a leader again
  (JetStream's own election, ``$JS.API.STREAM.INFO`` polled every 50 ms:
  the part of the wait that is nats-server's, 4-9 s in 2.9), the time of
  JetStream's own advisory of the new leader (``LEADER_ELECTED``, sent by
  the leader as it takes over: the election's end, not a poll's), and the
  rest of the wait, fenghuo's: from that advisory to the first ack;
* publish-to-deliver p50/p99 (first send to arrival, retries included)
  before the kill and during the event (messages first sent from the kill
  until one second after the channel was sequenced again).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import nats
import nats.aio.client
import nats.aio.msg
import nats.errors
import numpy as np
import orjson
import uvloop

import fenghuo
from bench.cluster import FenghuoCluster
from bench.geo import watch_loop_lag
from fenghuo.client import FenghuoError
from fenghuo.core import ErrorCode
from fenghuo.server.frames import decode_frame_message
from fenghuo.server.jetstream import Engine

clock = time.monotonic
GROUP = "busy"
CHANNEL = f"group:{GROUP}"
RETRYABLE = (ErrorCode.INTERNAL, ErrorCode.REQUEST_TIMEOUT)
# How long a publish keeps retrying under its key before the run gives it up
# (counted as "not acked", never as lost: only acked messages can be lost).
RETRY_FOR_S = 30.0
# After the last ack, how long receivers may take to get everything.
DRAIN_S = 15.0
VICTIMS = ("node", "nats")
# Issue 11: a channel whose owner died is sequenced again within 5 s.
TARGET_RECOVERY_S = 5.0
# JetStream's advisory that the stream has a new leader (nats-server's
# JSAdvisoryStreamLeaderElectedPre), sent once the election is won.
ELECTED_ADVISORY = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.FENGHUO"


@dataclass
class Published:
    key: str
    first_sent: float
    acked_at: float | None = None
    seq: int | None = None
    retries: int = 0


@dataclass
class Receiver:
    name: str
    #: key -> arrival times (more than one: a duplicate at the app)
    got: dict[str, list[float]] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)

    def on_message(self, message: fenghuo.Message) -> None:
        if message.channel != CHANNEL or not message.payload.startswith(b'{"k"'):
            return          # the group's own events
        body = orjson.loads(message.payload)
        self.got.setdefault(body["k"], []).append(clock())
        self.seqs.append(message.seq)


@dataclass
class Event:
    victim: str
    published: list[Published] = field(default_factory=list)
    receivers: list[Receiver] = field(default_factory=list)
    killed_at: float = 0.0
    #: when the stream named a live leader again (the nats-server victim only)
    leader_at: float | None = None
    #: when JetStream's advisory of the stream's new leader arrived (the nats-server victim only)
    elected_at: float | None = None
    #: (seq, payload) as the stream holds the channel, and as HISTORY on node 1 serves it
    stored: list[tuple[int, bytes]] = field(default_factory=list)
    history: list[tuple[int, bytes]] = field(default_factory=list)
    #: how late this process's loop woke, 10 ms sleeps, from the load's start:
    #: every time above is read by it, so a stall of its own would land in them
    loop_lags: list[float] = field(default_factory=list)


async def _publish(client: fenghuo.Client, p: Published) -> None:
    payload = orjson.dumps({"k": p.key, "t": p.first_sent}).decode()
    deadline = p.first_sent + RETRY_FOR_S
    while True:
        try:
            ack = await client.publish(CHANNEL, payload, key=p.key)
            p.acked_at, p.seq = clock(), ack.seq
            return
        except FenghuoError as exc:
            if exc.code not in RETRYABLE or clock() > deadline:
                return
            p.retries += 1
            await asyncio.sleep(0.1)


async def _load(event: Event, client: fenghuo.Client, rate: float, until: float) -> None:
    """Publish at ``rate``/s until ``until``, then wait for every publish to be acked (or give up)."""
    tasks = []
    start = clock()
    for i in itertools.count():
        due = start + i / rate
        if due >= until:
            break
        await asyncio.sleep(max(0.0, due - clock()))
        p = Published(f"{client.user}-{i}", clock())
        event.published.append(p)
        tasks.append(asyncio.ensure_future(_publish(client, p)))
    await asyncio.gather(*tasks)


async def _stream_leader(cluster: FenghuoCluster) -> str:
    assert cluster.nats is not None
    nc = await nats.connect(cluster.nats.urls)
    try:
        info = await nc.jetstream().stream_info("FENGHUO")
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


async def _leader_elected(cluster: FenghuoCluster, event: Event, killed: str) -> None:
    """Poll the stream's info until a leader other than ``killed`` answers it."""
    assert cluster.nats is not None
    alive = [s.url for s in cluster.nats.servers if s.name != killed]
    nc = await nats.connect(alive)
    try:
        js = nc.jetstream(timeout=0.5)
        while clock() < event.killed_at + RETRY_FOR_S:
            try:
                info = await js.stream_info("FENGHUO")
                if info.cluster is not None and info.cluster.leader not in (None, killed):
                    event.leader_at = clock()
                    return
            except nats.errors.Error:
                pass
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def _elected(cluster: FenghuoCluster, event: Event, killed: str) -> nats.aio.client.Client:
    """Subscribe, through the servers that will live, to JetStream's advisory of the
    stream's new leader, and note when the first one after the kill arrives; the
    connection, to close once the event is over."""
    assert cluster.nats is not None
    nc = await nats.connect([s.url for s in cluster.nats.servers if s.name != killed])

    async def on_advisory(_msg: nats.aio.msg.Msg) -> None:
        if event.killed_at and event.elected_at is None:
            event.elected_at = clock()

    await nc.subscribe(ELECTED_ADVISORY, cb=on_advisory)
    await nc.flush()
    return nc


def _client(cluster: FenghuoCluster, k: int, user: str, **kwargs: Any) -> fenghuo.Client:
    return fenghuo.Client(f"tcp://127.0.0.1:{cluster.nodes[k].port}", user=user,
                          secret=cluster.secret, device=f"{user}-dev", reconnect=False, **kwargs)


async def _history(client: fenghuo.Client) -> list[tuple[int, bytes]]:
    """The channel as HISTORY on ``client``'s node serves it."""
    got: list[tuple[int, bytes]] = []
    while page := await client.history(CHANNEL, after=got[-1][0] if got else 0, limit=500):
        got += [(m.seq, m.payload) for m in page]
    return got


async def _stored(cluster: FenghuoCluster) -> list[tuple[int, bytes]]:
    """The channel as the stream holds it: what JetStream stored, read from the engine."""
    assert cluster.nats is not None
    alive = [s.url for s in cluster.nats.servers if s.proc and s.proc.poll() is None]
    nc = await nats.connect(alive)
    try:
        stored = await Engine(nc, 3).read(CHANNEL, 0, 1 << 62, 1 << 30)
    finally:
        await nc.close()
    messages = [decode_frame_message(m.frame) for m in stored]
    return [(m.seq, m.payload) for m in messages]


async def _move(cluster: FenghuoCluster, old: fenghuo.Client, receiver: Receiver,
                to: int) -> fenghuo.Client:
    """``old``'s device reconnects to node ``to`` and resumes by its positions."""
    moved = _client(cluster, to, old.user or "")
    moved.positions, moved.epoch = dict(old.positions), old.epoch
    moved.on_message(receiver.on_message)
    deadline = clock() + RETRY_FOR_S
    while True:
        try:
            return await moved.connect()
        except (OSError, FenghuoError):
            if clock() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _event(cluster: FenghuoCluster, victim: str, a: argparse.Namespace) -> Event:
    event = Event(victim)
    owner = await _client(cluster, 0, "owner").connect()
    users = ["pub1", "pub2", "recv0", "recv1", "recv2"]
    await owner.create_group(GROUP, users)
    receivers = []
    clients = [owner]
    for k, user in ((0, "recv0"), (1, "recv1"), (2, "recv2")):
        receiver = Receiver(f"{user} (node {k})")
        client = _client(cluster, k, user)
        client.on_message(receiver.on_message)
        clients.append(await client.connect())
        receivers.append(receiver)
    event.receivers = receivers
    pubs = [await _client(cluster, k, user).connect() for k, user in ((1, "pub1"), (2, "pub2"))]
    clients += pubs
    advisories: nats.aio.client.Client | None = None
    watching = asyncio.ensure_future(watch_loop_lag(event.loop_lags))
    try:
        start = clock()
        until = start + a.failover_before + a.failover_after
        loads = [asyncio.ensure_future(_load(event, p, a.failover_rate / 2, until)) for p in pubs]
        await asyncio.sleep(a.failover_before)
        if victim == "node":
            event.killed_at = clock()
            node = cluster.nodes[0].proc
            assert node is not None
            node.kill()                             # SIGKILL, what a crash looks like
            clients[1] = await _move(cluster, clients[1], receivers[0], 1)
        else:
            leader = await _stream_leader(cluster)
            assert cluster.nats is not None
            server = next(s for s in cluster.nats.servers if s.name == leader)
            advisories = await _elected(cluster, event, leader)
            event.killed_at = clock()
            server.kill()
            event.victim = f"nats ({leader}, the stream leader)"
            loads.append(asyncio.ensure_future(_leader_elected(cluster, event, leader)))
        await asyncio.gather(*loads)
        acked = {p.key for p in event.published if p.seq is not None}
        deadline = clock() + DRAIN_S
        while clock() < deadline and not all(acked <= set(r.got) for r in receivers):
            await asyncio.sleep(0.1)
        event.stored = await _stored(cluster)
        event.history = await _history(pubs[0])
    finally:
        watching.cancel()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if advisories is not None:
            await advisories.close()
    return event


def _ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"p50": None, "p99": None, "max": None}
    ms = np.asarray(values_s) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99, method="higher")), 1),
            "max": round(float(ms.max()), 1)}


def _keys(messages: list[tuple[int, bytes]]) -> list[str]:
    return [orjson.loads(p)["k"] for _, p in messages if p.startswith(b'{"k"')]


def summarize(event: Event) -> dict[str, Any]:
    keys = _keys(event.stored)
    history = set(_keys(event.history))
    stored_keys = set(keys)
    acked = [p for p in event.published if p.seq is not None]
    seqs = [s for s, _ in event.stored]
    after_kill = [p for p in acked if p.first_sent >= event.killed_at]
    sequenced_again = min((p.acked_at for p in after_kill if p.acked_at is not None), default=None)
    recovered_s = None if sequenced_again is None else sequenced_again - event.killed_at
    window_end = (sequenced_again or event.killed_at) + 1.0
    sent_at = {p.key: p.first_sent for p in event.published}
    before, during = [], []
    for r in event.receivers:
        for key, times in r.got.items():
            latency = times[0] - sent_at[key]
            if sent_at[key] < event.killed_at:
                before.append(latency)
            elif sent_at[key] <= window_end:
                during.append(latency)
    return {
        "victim": event.victim,
        "published": len(event.published),
        "acked": len(acked),
        "not_acked_within_retry": len(event.published) - len(acked),
        "retries": sum(p.retries for p in event.published),
        "stored": len(keys),
        "lost_acked_not_stored": sum(1 for p in acked if p.key not in stored_keys),
        "stored_twice": len(keys) - len(stored_keys),
        "stored_seqs_gap_free": seqs == list(range(1, len(seqs) + 1)),
        "acked_not_in_history_on_node_1": sum(1 for p in acked if p.key not in history),
        "receivers": {r.name: {
            "acked_not_received": sum(1 for p in acked if p.key not in r.got),
            "duplicates": sum(len(t) - 1 for t in r.got.values()),
            "in_seq_order": r.seqs == sorted(r.seqs),
        } for r in event.receivers},
        "sequenced_again_after_s": None if recovered_s is None else round(recovered_s, 3),
        "stream_leader_again_after_s": (None if event.leader_at is None
                                        else round(event.leader_at - event.killed_at, 3)),
        "stream_leader_elected_after_s": (None if event.elected_at is None
                                          else round(event.elected_at - event.killed_at, 3)),
        "sequenced_again_after_election_s": (
            None if event.elected_at is None or sequenced_again is None
            else round(sequenced_again - event.elected_at, 3)),
        "latency_before_ms": _ms(before),
        "latency_during_ms": _ms(during),
        "bench_loop_lag_ms": _ms(event.loop_lags),
    }


def ok(s: dict[str, Any]) -> bool:
    return (s["lost_acked_not_stored"] == 0 and s["stored_twice"] == 0
            and s["stored_seqs_gap_free"] and s["sequenced_again_after_s"] is not None
            and all(r["acked_not_received"] == 0 and r["duplicates"] == 0 and r["in_seq_order"]
                    for r in s["receivers"].values()))


def table(summaries: list[dict[str, Any]]) -> str:
    cols = ("killed", "acked / published", "lost (acked, not stored)", "not received (per receiver)",
            "duplicates at the app", "stored gap-free", "acked, not in history on node 1",
            "sequenced again after", "stream led again after", "leader elected (advisory) after",
            "sequenced again after the advisory",
            "p50 / p99 before", "p50 / p99 during")
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for s in summaries:
        rec = s["receivers"].values()
        again = s["sequenced_again_after_s"]
        b, d = s["latency_before_ms"], s["latency_during_ms"]
        lines.append("| " + " | ".join([
            s["victim"], f"{s['acked']} / {s['published']}", str(s["lost_acked_not_stored"]),
            " / ".join(str(r["acked_not_received"]) for r in rec),
            str(s["stored_twice"] + sum(r["duplicates"] for r in rec)),
            "yes" if s["stored_seqs_gap_free"] else "NO",
            str(s["acked_not_in_history_on_node_1"]),
            "-" if again is None else f"{again:.2f} s",
            "-" if (led := s["stream_leader_again_after_s"]) is None else f"{led:.2f} s",
            "-" if (won := s["stream_leader_elected_after_s"]) is None else f"{won:.2f} s",
            "-" if (rest := s["sequenced_again_after_election_s"]) is None else f"{rest:.3f} s",
            f"{b['p50']} / {b['p99']} ms", f"{d['p50']} / {d['p99']} ms"]) + " |")
    return "\n".join(lines)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--failover-victims", default=",".join(VICTIMS),
                   help="failover: comma-separated, from node,nats")
    p.add_argument("--failover-rate", type=float, default=100.0,
                   help="failover: publishes/s offered in all (two publishers)")
    p.add_argument("--failover-before", type=float, default=3.0,
                   help="failover: seconds of load before the kill")
    p.add_argument("--failover-after", type=float, default=8.0,
                   help="failover: seconds of load after the kill")


def run(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    summaries = []
    for victim in a.failover_victims.split(","):
        if victim not in VICTIMS:
            raise SystemExit(f"unknown failover victim {victim!r}: choose from node,nats")
        print(f"failover: kill -9 of the {victim} under load ...", file=sys.stderr, flush=True)
        with TemporaryDirectory(prefix="bench-failover-") as workdir:
            cluster = FenghuoCluster(secrets.token_urlsafe(32))
            cluster.start(Path(workdir))
            try:
                event = uvloop.run(_event(cluster, victim, a))
            finally:
                cluster.stop()
        summaries.append(summarize(event))
    print()
    print(table(summaries))
    print(f"{a.failover_rate:g} publishes/s offered to one group of 6 (publishers on nodes 1 "
          f"and 2, node 0 sequences it), kill after {a.failover_before:g} s, "
          f"load {a.failover_after:g} s after")
    for s in summaries:
        again = s["sequenced_again_after_s"]
        print(f"verdict: kill -9 of the {s['victim']}: every acked message stored once, gap-free, "
              f"received once in order by every receiver: {'PASS' if ok(s) else 'FAIL'}; "
              f"sequenced again within {TARGET_RECOVERY_S:g} s: "
              f"{'PASS' if again is not None and again < TARGET_RECOVERY_S else 'FAIL'}")
        lag = s["bench_loop_lag_ms"]
        print(f"this process's event-loop lag over the {s['victim']} event (in every time "
              f"above): p99 {lag['p99']} ms, max {lag['max']} ms")
    return summaries, all(ok(s) for s in summaries)
