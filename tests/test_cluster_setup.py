"""A cluster node's start while JetStream cannot answer it (server/jetstream.py,
Engine.patiently): it keeps trying, says what it waits for and why, and comes up
once JetStream answers.  Real nats-servers and a real node process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from conftest import RelayProcess, start_relay
from fenghuo.server.jetstream import CLICKS, CURSORS, GROUPS, OWNERS
from scripts.nats_cluster import NatsCluster, NatsServer


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


class NatsProxy:
    """A TCP proxy to a nats-server whose two pumps, :meth:`_up` (client to
    server) and :meth:`_down`, see the NATS protocol frame by frame
    (:meth:`_frames`); as they stand, they pass everything."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []     # both ends of every connection
        self.severed = False

    def cut(self) -> None:
        """From now on pass nothing, either way, and keep every connection open:
        a link whose packets are lost, which its client does not notice (nats-py
        finds a silent server dead only after two missed pings, minutes), unlike
        :meth:`close`.  Only the plain pumps (:meth:`_up`, :meth:`_down`) obey it."""
        self.severed = True

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        """Stop listening and end every connection carried, both ways: its client
        sees its server gone (and reconnects to another), as when a nats-server
        dies.  Cancelling the pumps alone left the client's socket open and
        silent: a node whose only link was that socket noticed nothing, and
        its stop at the test's end waited out every NATS request's timeout
        until it was killed (20-40 s of teardown per test)."""
        self.server.close()
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += (writer, up_writer)
        for pump in (self._up(reader, up_writer), self._down(up_reader, writer, up_writer)):
            task = asyncio.ensure_future(pump)
            self.tasks.add(task)

    @staticmethod
    async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[list[bytes], bytes]]:
        buf = b""
        while data := await reader.read(65536):
            buf += data
            while (eol := buf.find(b"\r\n")) >= 0:
                words = buf[:eol].split()
                end = eol + 2
                if words and words[0] in (b"PUB", b"HPUB", b"MSG", b"HMSG"):
                    end += int(words[-1]) + 2
                    if len(buf) < end:
                        break
                frame, buf = buf[:end], buf[end:]
                yield words, frame

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.severed:
                writer.write(data)
        writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.severed:
                writer.write(data)
        writer.close()


class HoldingProxy(NatsProxy):
    """A TCP proxy to a nats-server that keeps a bucket's watches from
    finishing their replay: it holds every message the server delivers on a
    subject beginning ``held`` (the bucket's entries) until ``release``.
    Everything else passes, both ways.  It parses the NATS protocol: PUB,
    HPUB, MSG and HMSG by their byte counts, one line for anything else."""

    def __init__(self, target: tuple[str, int], bucket: str) -> None:
        super().__init__(target)
        self.held = f"$KV.{bucket}.".encode()
        self.holding = True
        self.kept: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.count = 0          # entries held back

    def release(self) -> None:
        self.holding = False
        for writer, frame in self.kept:
            writer.write(frame)
        self.kept.clear()

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _, frame in self._frames(reader):
            writer.write(frame)
        writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            delivery = words[:1] in ([b"MSG"], [b"HMSG"])
            if self.holding and delivery and words[1].startswith(self.held):
                self.kept.append((writer, frame))
                self.count += 1
                continue
            writer.write(frame)
        writer.close()


def _watch_subscriptions(server: NatsServer, name: str) -> list[str]:
    """The subjects of the plain inboxes connection ``name`` subscribes on
    ``server`` (nats-py's ordered consumers deliver there: one per watch)."""
    with urllib.request.urlopen(f"http://{server.host}:{server.http_port}/connz?subs=1",
                                timeout=5) as answer:
        conns = json.load(answer)["connections"]
    [conn] = [c for c in conns if c.get("name") == name]
    return [s for s in conn.get("subscriptions_list", [])
            if s.startswith("_INBOX.") and "*" not in s and ">" not in s]


async def test_a_watch_whose_replay_timed_out_is_stopped_before_the_retry(
        tmp_path: Path, nats_cluster: NatsCluster):
    """A node joins while the groups bucket's entries are held from it: its watch
    of the bucket (Engine.watch) does not finish its replay within 30 s and is
    tried again; released, the node joins.  The watch given up is stopped: the
    node has as many watch subscriptions as a node that joined plainly (before,
    one more: the first watch went on beside the second)."""
    first = nats_cluster.servers[0]

    def start_node(log: Path, url: str, name: str) -> RelayProcess:
        log.mkdir(exist_ok=True)
        return start_relay(log, "--cluster", url, "--node", name, workers=1, timeout=150)

    plain = await asyncio.to_thread(start_node, tmp_path / "a", first.url, "n0")
    proxy = HoldingProxy((first.host, first.port), "fenghuo_groups")
    joining: asyncio.Future[RelayProcess] | None = None
    try:
        owner = await plain.connect("alice")
        await owner.create_group("g1", members=["bob"])    # an entry for the replay
        await owner.close()
        nc = await nats.connect(first.url)
        try:
            groups = await nc.jetstream().key_value("fenghuo_groups")
            for _ in range(100):      # in the bucket (written beside the RESULT, not before)
                with contextlib.suppress(nats.js.errors.NoKeysError):
                    if await groups.keys():
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the group never reached the bucket")
        finally:
            await nc.close()
        url = await proxy.start()
        joining = asyncio.ensure_future(asyncio.to_thread(start_node, tmp_path / "b", url, "n1"))
        for _ in range(600):      # the replay's 30 s, and its retry logged
            waits = _waits(tmp_path / "b")
            if any(w.get("waiting_for") == "the watch fenghuo-fenghuo_groups"
                   and "TimeoutError" in w.get("error", "") for w in waits):
                break
            assert not joining.done(), f"joined with the entries held: {proxy.count} held, {waits}"
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"120 s and no retry of the groups' watch: {waits}")
        assert proxy.count >= 1
        proxy.release()
        node = await joining
        assert '"joined the cluster"' in node.log()
        assert (len(_watch_subscriptions(first, "fenghuo-n1"))
                == len(_watch_subscriptions(first, "fenghuo-n0")))
    finally:
        proxy.release()
        if joining is not None:
            with contextlib.suppress(Exception):
                # In a thread: n1 reaches NATS only through the proxy, which
                # this loop runs; stopped here, its stop waited out its timeouts.
                await asyncio.to_thread((await joining).stop)
        await proxy.close()
        plain.stop()


async def test_a_node_closed_normally_stops_its_watches_and_warns_of_nothing(
        tmp_path: Path, nats_cluster: NatsCluster):
    """A node watches four buckets (claims, groups, cursors, clicks), each
    through an ordered consumer on the bucket's stream.  Closed normally
    (SIGTERM), it stops each watch before its NATS connection: no consumer of
    it is left on the server, and its log has no warning or error.  Before,
    the watches' tasks were cancelled and the connection closed under them:
    their consumers stayed for nats-py's inactive threshold (5 minutes), and
    the close logged "disconnected from NATS" as a warning."""
    watched = [f"KV_{b}" for b in (OWNERS, GROUPS, CURSORS, CLICKS)]
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()

        async def consumers() -> list[int]:
            return [(await js.stream_info(s)).state.consumer_count for s in watched]
        node = await asyncio.to_thread(start_relay, tmp_path, "--cluster",
                                       ",".join(nats_cluster.urls), "--node", "n0", workers=1)
        try:
            assert await consumers() == [1, 1, 1, 1]
            client = await node.connect("alice")
            await client.create_group("g", members=["bob"])
            await client.close()
        finally:
            assert node.stop() == 0
        assert await consumers() == [0, 0, 0, 0]
        lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
        stopping = next(i for i, line in enumerate(lines) if line["msg"] == "shutting down")
        assert [line for line in lines[stopping:]
                if line["level"] in ("warning", "error", "critical")] == []
    finally:
        await nc.close()
