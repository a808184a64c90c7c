"""``python -m bench cluster --parts asks``: what a replica node's ask again costs.

A replica node asks an owner node again for EVERY replica that owner feeds
it (``_ask_again``: ``interest`` records of up to 1,000 channels, each
answered by the rings after the replicas' seqs and a ``warm``; one record a
channel before 2026-12-07) when the owner's heads records
show a number skipped, when the owner restarted, or after a lost lease
(docs/DESIGN.md, "An owner lists its busy channels' heads").  Here, on a
fresh cluster (three nats-servers, two nodes, ``--cluster-lease``
``--asks-lease`` so that a restart is not a failover), ``n0`` sequences
``--asks-channels`` groups, each with one member online on ``n1``, whose
link to its nats-server goes through a proxy in this process that counts
(and can drop) the records between the nodes.  Then, per trigger:

* ``heads``: the records ``n0`` sends ``n1`` are dropped for
  ``--asks-loss`` seconds (a heads record lost; every server stays up);
* ``restart``: ``n0`` is killed (SIGKILL) and started again at once, within
  the lease.  The new process owns none of the channels until it claims
  them again (at their next publish), so it answers none of the asks: the
  row shows the asks alone, counted until none came for ``QUIET_S``.

Reported, from the trigger: the ``interest`` records ``n1`` sent and their
bytes, the records ``n0`` sent ``n1`` (``warm`` among them) and their bytes,
the time from the first ask to the warm of every channel (every replica
current again), asks repeated (``asks_repeated``: an ask unanswered five
heads records later), the CPU seconds ``n0`` and ``n1`` spent meanwhile, and
the publish-to-deliver latency of a probe (a group ``n1`` sequences, its
publisher and receiver on ``n1``, ``--asks-probe-rate`` publishes/s) before
the trigger and during the burst, and what became of each of its publishes
(``Probe.account``: delivered, late, acked and never delivered, refused by
code, unanswered), in four windows that cover them all.  Every process of
the cluster is pinned to CPU 0 as in every cluster bench; this process
(clients and proxy) to CPU 1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import uvloop

import fenghuo
from bench import cluster_failover
from bench.cluster import FenghuoCluster
from bench.cluster_failover import _client

clock = time.monotonic
TRIGGERS = ("heads", "restart")
NODE_SUBJECT = b"fh.node."
ASK, ANSWERED = b'"op":"interest"', b'"op":"warm"'
# A channel a warm answers for: its "channels" list's name -> head entries.
CHANNEL = re.compile(rb'"([^"]+)":\d')
# Groups created at once while the channels are made.
CREATING = 200
# How long every replica may take to be current again before the run says so.
SETTLE_S = 120.0
# Seconds watched after every replica is current: asks repeated needlessly
# (ASK_PATIENCE heads records after they were sent) show here.
AFTER_S = 7.0
# After a restart, the asks are over once none came for this long (they come
# in rounds: at the restart seen, repeated ASK_PATIENCE heads records later;
# before 2026-12-07 also at the heads number from 1).
QUIET_S = 7.0
# How long a restarted owner may take to listen: with 10,000 channels it took
# over 15 s (the target's default) at load 11.
RESTART_S = 120.0


class Link:
    """A TCP proxy, run on a thread of its own, between ``n1`` and its nats-server:
    it reads the NATS protocol frame by frame both ways, counts the records
    between the nodes and drops the ones to ``n1`` while :attr:`dropping`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.drop_until = 0.0
        self.asks = self.ask_bytes = 0                 # n1 -> n0: interest records
        self.records = self.record_bytes = 0           # n0 -> n1: every record
        self.answers = 0                               # n0 -> n1: warm records
        self.answered: set[bytes] = set()              # channels they named
        self.asked: set[bytes] = set()                 # channels the interest records named
        self.expect = 0                                # ... all of them once this many
        self.current_at: float | None = None
        self.dropped = 0
        self.first_ask: float | None = None
        self.last_ask: float | None = None
        self.last_answer: float | None = None

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(
                asyncio.start_server(self._client, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
        threading.Thread(target=run, name="bench-asks-link", daemon=True).start()
        ready.wait(10)
        return f"nats://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.asks = self.ask_bytes = self.records = self.record_bytes = self.answers = 0
        self.answered, self.asked = set(), set()
        self.first_ask = self.last_ask = self.last_answer = self.current_at = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        asyncio.ensure_future(self._pump(reader, up_writer, up=True))
        asyncio.ensure_future(self._pump(up_reader, writer, up=False))

    @staticmethod
    async def _frames(reader: asyncio.StreamReader):
        buf = b""
        while data := await reader.read(65536):
            buf += data
            at = 0
            while (eol := buf.find(b"\r\n", at)) >= 0:
                words = buf[at:eol].split(None, 2)
                end = eol + 2
                if words and words[0] in (b"PUB", b"HPUB", b"MSG", b"HMSG"):
                    end += int(buf[at:eol].rsplit(None, 1)[-1]) + 2
                    if len(buf) < end:
                        break
                yield words, buf[at:end]
                at = end
            buf = buf[at:]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: bool) -> None:
        try:
            async for words, frame in self._frames(reader):
                if len(words) > 1 and words[1].startswith(NODE_SUBJECT) and \
                        words[0] in (b"PUB", b"HPUB", b"MSG", b"HMSG"):
                    if not self._count(frame, up):
                        continue
                writer.write(frame)
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        finally:
            writer.close()

    def _count(self, frame: bytes, up: bool) -> bool:
        """Count a record between the nodes; False to drop it."""
        now = clock()
        if up:
            if ASK in frame:
                self.asks += 1
                self.ask_bytes += len(frame)
                self.asked.update(named.group(1) for named in CHANNEL.finditer(frame))
                if self.first_ask is None:
                    self.first_ask = now
                self.last_ask = now
            return True
        if now < self.drop_until:
            self.dropped += 1
            return False
        self.records += 1
        self.record_bytes += len(frame)
        if ANSWERED in frame:
            self.answers += 1
            self.last_answer = now
            self.answered.update(named.group(1) for named in CHANNEL.finditer(frame))
            if len(self.answered) >= self.expect and self.current_at is None:
                self.current_at = now
        return True


class AsksCluster(FenghuoCluster):
    """Two nodes; ``n1`` reaches NATS only through :attr:`link`."""

    def __init__(self, secret: str, lease: float) -> None:
        super().__init__(secret, nodes=2, name="asks", lease=lease)
        self.link: Link | None = None

    def urls_of(self, k: int) -> str:
        if k == 0:
            return super().urls_of(k)
        if self.link is None:
            assert self.nats is not None
            server = self.nats.servers[1]
            self.link = Link((server.host, server.port))
            self.link.start()
        return f"nats://127.0.0.1:{self.link.port}"


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# After the probe stops, how long its publishes still unanswered may take
# before they are counted as never answered.
PROBE_WAIT_S = 10.0
# A publish sent this much after its turn was held up in this process (its
# loop blocked, or starved of CPU), not in the cluster.
PROBE_BEHIND_S = 0.1
OUTCOMES = ("delivered", "late", "acked_not_delivered", "refused", "unanswered")


@dataclass
class Probe:
    """Publishes to a group ``n1`` sequences and times each one's ack (or error)
    and its arrival on ``n1``, so that every publish is accounted for."""
    sent: dict[int, float] = field(default_factory=dict)
    behind: set[int] = field(default_factory=set)               # sent past its turn
    acked: dict[int, float] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)       # publish -> error code
    arrived: dict[int, float] = field(default_factory=dict)

    def on_message(self, message: fenghuo.Message) -> None:
        if message.channel == "group:probe" and message.payload.startswith(b"p"):
            self.arrived.setdefault(int(message.payload[1:]), clock())

    async def _publish(self, client: fenghuo.Client, i: int) -> None:
        try:
            await client.publish("group:probe", f"p{i}")
        except fenghuo.FenghuoError as e:               # ConnectionLost is code 0
            self.refused[i] = e.code
        else:
            self.acked[i] = clock()

    async def run(self, client: fenghuo.Client, rate: float, stop: asyncio.Event) -> None:
        start = clock()
        publishes = []
        for i in range(1 << 30):
            await asyncio.sleep(max(0.0, start + i / rate - clock()))
            if stop.is_set():
                break
            self.sent[i] = clock()
            if self.sent[i] - (start + i / rate) > PROBE_BEHIND_S:
                self.behind.add(i)
            publishes.append(asyncio.ensure_future(self._publish(client, i)))
        # The client waits for an answer for ever (it resends on reconnect):
        # what is still unanswered after PROBE_WAIT_S is counted so.
        _, pending = await asyncio.wait(publishes, timeout=PROBE_WAIT_S) if publishes \
            else (set(), set())
        for task in pending:
            task.cancel()

    def latencies(self, start: float, end: float) -> list[float]:
        return [self.arrived[i] - t for i, t in self.sent.items()
                if start <= t < end and i in self.arrived]

    def account(self, start: float, end: float) -> dict[str, Any]:
        """Every publish sent in [start, end), in exactly one of OUTCOMES:
        acked and arrived by ``end`` (``delivered``, with its publish-to-deliver
        and publish-to-ack latency), acked and arrived after ``end`` (``late``),
        acked and never arrived while the receiver was connected, refused (an
        ERROR; ``refused_codes`` by code, 0 for a connection lost), or neither
        acked nor refused within PROBE_WAIT_S of the probe's stop
        (``unanswered``; ``unanswered_arrived`` of them arrived all the same).
        ``sent_behind`` counts those sent over PROBE_BEHIND_S after their turn
        (this process held up: fewer sent in the window than its rate says)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        codes: dict[str, int] = {}
        delivered: list[float] = []
        acks: list[float] = []
        late: list[float] = []
        unanswered_arrived = 0
        for i, t in self.sent.items():
            if not start <= t < end:
                continue
            arrived = self.arrived.get(i)
            if i in self.refused:
                outcome = "refused"
                code = str(self.refused[i])
                codes[code] = codes.get(code, 0) + 1
            elif i not in self.acked:
                outcome = "unanswered"
                unanswered_arrived += arrived is not None
            elif arrived is None:
                outcome = "acked_not_delivered"
            elif arrived < end:
                outcome = "delivered"
                delivered.append(arrived - t)
            else:
                outcome = "late"
                late.append(arrived - t)
            if i in self.acked:
                acks.append(self.acked[i] - t)
            counts[outcome] += 1
        return {"sent": sum(counts.values()), **counts, "refused_codes": codes,
                "sent_behind": sum(start <= self.sent[i] < end for i in self.behind),
                "unanswered_arrived": unanswered_arrived,
                "delivered_ms": _ms(delivered), "late_ms": _ms(late), "ack_ms": _ms(acks)}

    def timeline(self, zero: float) -> list[list[float | int | None]]:
        """Per publish: [sent, acked, arrived] seconds after ``zero`` (None if
        not) and the error code (None if none)."""
        def at(t: float | None) -> float | None:
            return None if t is None else round(t - zero, 3)
        return [[at(t), at(self.acked.get(i)), at(self.arrived.get(i)), self.refused.get(i)]
                for i, t in sorted(self.sent.items())]


def _ms(values: list[float]) -> dict[str, float | None]:
    return {**cluster_failover._ms(values), "n": len(values)}


async def _make_channels(cluster: FenghuoCluster, link: Link, channels: int) -> list[Any]:
    """``channels`` groups ``n0`` sequences, each with ``carol`` online on ``n1``,
    every replica of them current on ``n1``; and the probe's group on ``n1``."""
    carol = await _client(cluster, 1, "carol").connect()
    alice = await _client(cluster, 0, "alice").connect()
    sem = asyncio.Semaphore(CREATING)

    async def create(k: int) -> None:
        async with sem:
            await alice.create_group(f"g{k}", ["carol"])
    await asyncio.gather(*(create(k) for k in range(channels)))
    deadline = clock() + SETTLE_S
    while len(link.answered) < channels and clock() < deadline:
        await asyncio.sleep(0.1)
    if len(link.answered) < channels:
        raise SystemExit(f"asks: only {len(link.answered)} of {channels} replicas made on n1")
    pa = await _client(cluster, 1, "pa").connect()
    await pa.create_group("probe", ["pb"])
    return [carol, alice, pa]


def _node_health(cluster: FenghuoCluster, k: int) -> dict[str, Any]:
    return cluster.health(k)["cluster"]


async def _event(cluster: AsksCluster, trigger: str, channels: int, a: argparse.Namespace,
                 workdir: Path) -> dict[str, Any]:
    link = cluster.link
    assert link is not None
    clients = await _make_channels(cluster, link, channels)
    probe = Probe()
    pb = _client(cluster, 1, "pb")
    pb.on_message(probe.on_message)
    clients.append(await pb.connect())
    stop = asyncio.Event()
    probing = asyncio.ensure_future(probe.run(clients[2], a.asks_probe_rate, stop))
    try:
        start = clock()
        await asyncio.sleep(2.0)
        before = _node_health(cluster, 1)
        link.reset()
        link.expect = channels
        pids = [cluster.nodes[0].pid, cluster.nodes[1].pid]
        cpu0 = [_cpu_s(p) for p in pids]
        triggered = clock()
        listening = None
        quiet_from = triggered
        if trigger == "heads":
            link.drop_until = triggered + a.asks_loss
            await asyncio.sleep(a.asks_loss)
        else:
            node = cluster.nodes[0]
            assert node.proc is not None
            node.proc.kill()
            node.proc.wait()
            restarted = clock()
            cluster.nodes[0] = await asyncio.to_thread(cluster.start_node, 0, workdir / "n0-again",
                                                       RESTART_S)
            quiet_from = clock()
            listening = quiet_from - restarted
            pids[0], cpu0[0] = cluster.nodes[0].pid, 0.0   # its start-up counted too
        deadline = clock() + SETTLE_S
        while clock() < deadline and not (
                len(link.answered) >= channels if trigger == "heads"
                # A restarted owner answers none (it owns none yet): until they
                # stop.  Quiet from the restarted owner's listening, not only
                # from the last ask: its first heads records (numbered from 1:
                # the second round) come only once it runs, which took 18 s at
                # load 10, more than QUIET_S after the first round.
                else link.last_ask is not None
                and clock() - max(link.last_ask, quiet_from) > QUIET_S):
            await asyncio.sleep(0.02)
        current = clock() if len(link.answered) >= channels else None
        cpu1 = [_cpu_s(p) for p in pids]
        burst_end = link.current_at or link.last_ask or clock()
        asks_in_window = link.asks
        await asyncio.sleep(AFTER_S)                   # asks repeated, answers still coming
        after = _node_health(cluster, 1)
        cpu2 = [_cpu_s(p) for p in pids]
    finally:
        stop.set()
        await probing
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    first = link.first_ask
    return {
        "trigger": trigger, "channels": channels,
        "restarted_listening_after_s": None if listening is None else round(listening, 3),
        "asks": link.asks, "ask_bytes": link.ask_bytes,
        # Asks counted after the burst's window (the probe's "during") closed:
        # not 0, the window missed part of the burst.
        "asks_after_window": link.asks - asks_in_window,
        "burst_end_after_s": round(burst_end - triggered, 3),
        "records_to_replica": link.records, "record_bytes": link.record_bytes,
        "answers": link.answers, "channels_answered": len(link.answered),
        "channels_asked": len(link.asked),
        "dropped": link.dropped,
        "first_ask_after_s": None if first is None else round(first - triggered, 3),
        "last_ask_after_s": None if link.last_ask is None else round(link.last_ask - triggered, 3),
        "current_after_first_ask_s": (None if current is None or first is None
                                      else round(burst_end - first, 3)),
        "current_after_trigger_s": None if current is None else round(burst_end - triggered, 3),
        "last_answer_after_trigger_s": (None if link.last_answer is None
                                        else round(link.last_answer - triggered, 3)),
        "asks_repeated": after.get("asks_repeated", 0) - before.get("asks_repeated", 0),
        "heads_missed": after["heads_missed"] - before["heads_missed"],
        "cpu_owner_s": round(cpu1[0] - cpu0[0], 3),
        "cpu_replica_s": round(cpu1[1] - cpu0[1], 3),
        "cpu_owner_with_after_s": round(cpu2[0] - cpu0[0], 3),
        "cpu_replica_with_after_s": round(cpu2[1] - cpu0[1], 3),
        "probe_before_ms": _ms(probe.latencies(start + 0.5, triggered)),
        "probe_during_ms": _ms(probe.latencies(first or triggered, burst_end)),
        # Every probe publish accounted for, in one of four windows: before
        # the trigger, from it to the first ask, during the burst (the window
        # of probe_during_ms) and after it until the probe stopped.
        "probe_before": probe.account(0.0, triggered),
        "probe_to_first_ask": probe.account(triggered, first or triggered),
        "probe_during": probe.account(first or triggered, burst_end),
        "probe_after": probe.account(burst_end, math.inf),
        "probe_timeline": probe.timeline(triggered),
    }


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("trigger", "channels", "asks (records)", "ask bytes", "records to replica",
            "their bytes", "warm (channels)", "first / last ask after",
            "all current after first ask", "asks repeated",
            "owner CPU", "replica CPU", "probe p50 / p99 before", "probe p50 / p99 during (n)",
            "probe during: sent / delivered / late / acked not delivered / refused (codes) / "
            "unanswered")
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for r in rows:
        b, d = r["probe_before_ms"], r["probe_during_ms"]
        lines.append("| " + " | ".join([
            r["trigger"], f"{r['channels']:,}", f"{r['asks']:,}", f"{r['ask_bytes']:,}",
            f"{r['records_to_replica']:,}", f"{r['record_bytes']:,}",
            f"{r['answers']:,} ({r['channels_answered']:,})",
            "-" if r["first_ask_after_s"] is None
            else f"{r['first_ask_after_s']:.2f} / {r['last_ask_after_s']:.2f} s"
            + (f" ({r['asks_after_window']:,} after the window)" if r["asks_after_window"] else ""),
            "NOT" if r["current_after_first_ask_s"] is None
            else f"{r['current_after_first_ask_s']:.3f} s",
            str(r["asks_repeated"]), f"{r['cpu_owner_s']:.2f} s", f"{r['cpu_replica_s']:.2f} s",
            f"{b['p50']} / {b['p99']} ms", f"{d['p50']} / {d['p99']} ms ({d['n']})",
            _outcomes(r["probe_during"])]) + " |")
    return "\n".join(lines)


def _outcomes(a: dict[str, Any]) -> str:
    codes = ", ".join(f"{c}: {n}" for c, n in sorted(a["refused_codes"].items()))
    return (f"{a['sent']} / {a['delivered']} / {a['late']} / {a['acked_not_delivered']} / "
            f"{a['refused']}" + (f" ({codes})" if codes else "") + f" / {a['unanswered']}")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asks-channels", default="100,1000,10000",
                   help="asks: comma-separated counts of channels n0 feeds n1")
    p.add_argument("--asks-triggers", default=",".join(TRIGGERS),
                   help="asks: comma-separated, from heads,restart")
    p.add_argument("--asks-loss", type=float, default=1.5,
                   help="asks (heads): seconds n0's records to n1 are dropped")
    p.add_argument("--asks-lease", type=float, default=10.0,
                   help="asks: --cluster-lease of the nodes (a restart within it)")
    p.add_argument("--asks-probe-rate", type=float, default=50.0,
                   help="asks: the probe's publishes/s")


def run(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    rows = []
    for trigger in a.asks_triggers.split(","):
        if trigger not in TRIGGERS:
            raise SystemExit(f"unknown asks trigger {trigger!r}: choose from heads,restart")
        for channels in (int(n) for n in a.asks_channels.split(",")):
            print(f"asks: {trigger} with {channels} channels ...", file=sys.stderr, flush=True)
            with TemporaryDirectory(prefix="bench-asks-") as workdir:
                cluster = AsksCluster(secrets.token_urlsafe(32), a.asks_lease)
                cluster.start(Path(workdir))
                try:
                    rows.append(uvloop.run(_event(cluster, trigger, channels, a, Path(workdir))))
                finally:
                    cluster.stop()
    print()
    print(table(rows))
    print("asks: interest records n1 sent n0 from the trigger; records to replica: every record "
          "n0 sent n1 (warm, ring frames, heads); all current: from the first ask to the "
          "last channel's warm; CPU: user+system seconds from the trigger until then (after a "
          "restart: until the asks stopped, the owner's start-up included); probe: "
          f"publish-to-deliver on n1 at {a.asks_probe_rate:g}/s, during: from the first ask "
          "to the end of the burst; probe during: each publish of that window once, "
          "delivered (acked, arrived in the window), late (acked, arrived after it), acked "
          "not delivered (never arrived), refused (ERROR, by code; 0: connection lost), "
          f"unanswered (no ack nor ERROR {PROBE_WAIT_S:g} s after the probe stopped)")
    ok = all(r["current_after_first_ask_s"] is not None if r["trigger"] == "heads"
             else r["channels_asked"] >= r["channels"] for r in rows)
    print("verdict: every replica asked for again after every trigger, and current again "
          f"after a lost heads record: {'PASS' if ok else 'FAIL'}")
    return rows, ok
