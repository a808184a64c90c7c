"""The relays a benchmark can drive, each behind one small interface.

The generator (``bench/_gen.pyx``) never parses a protocol while it measures:
a run is built so that every frame of one kind has one size, the send stamp
sits at a fixed offset, and each link carries only the frames the run
counts.  A ``Target`` supplies exactly that: a server process, links that are
already authenticated and subscribed, and the byte layout (``Wire``) of a
publish and of a delivery for one channel.

Handshakes use asyncio streams; once a link is quiet its stream is handed to
the compiled generator (``Link.attach``), which takes the transport over with
``transport.set_protocol``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fenghuo.core import (
    ErrorCode,
    Frame,
    FrameReader,
    FrameType,
    decode_error,
    decode_message,
    encode_ack,
    encode_message,
    encode_publish,
)

from fenghuo.protocol import decode_json, encode_json, try_again_delay
from fenghuo.server.supervisor import die_with
from fenghuo.tokens import issue_token

STAMP_SIZE = 8
"""The send stamp: CLOCK_MONOTONIC nanoseconds, u64 big-endian, in the payload."""

RELAY_CPU, GENERATOR_CPU = 0, 1


def pin(cpu: int) -> None:
    """Pin the calling process to ``cpu`` where the machine has it."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def free_port(host: str = "127.0.0.1") -> int:
    """A free port for a server to listen on, below the ephemeral range (``free_ports``).

    Not the kernel's pick (bind to port 0): that comes from the ephemeral
    range, where any outgoing connection on the machine can take it between
    the pick and the server's bind.
    """
    return free_ports(1, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (a supervisor's metrics port and its workers').

    Looked for below the ephemeral range: there the kernel hands out no
    port by itself, so a busy machine's outgoing connections neither occupy
    the block nor take a port of it before the servers bind.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(10_000, max(10_001, low - count))
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


# How often a starting server is asked whether it is ready.  A refused connect
# or a 503 costs both sides about a millisecond, and every wait is on the
# critical path of a test or a benchmark run: the tests start about 850
# relays, each ready half a poll on average before it is seen to be (at 0.05 s
# and 0.1 s: 25-50 ms a start, bench/results/2026-12-07-cispeed).
READY_POLL_S = 0.02


def wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float = 15.0) -> None:
    """Block until ``host:port`` accepts, or fail with the process's fate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{program(proc)} exited with {proc.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(READY_POLL_S)
    state = process_state(proc.pid)
    proc.kill()
    raise RuntimeError(f"{program(proc)} did not listen on {host}:{port} within {timeout:g} s "
                       f"({state})")


def program(proc: subprocess.Popen) -> str:
    """The program ``proc`` runs (its first argument), for messages."""
    args = proc.args
    return os.fsdecode(args[0]) if isinstance(args, list | tuple) else str(args)


def process_state(pid: int) -> str:
    """What process ``pid`` is running and doing, from /proc: its command (a child
    still running this program's command never reached its exec), its state and
    threads, and the kernel function it sleeps in."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4]
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as exc:
        return f"no /proc state: {exc}"
    return (f"running {b' '.join(command).decode(errors='replace')!r}, state "
            f"{status.get('State', '?').strip()}, {status.get('Threads', '?').strip()} threads, "
            f"waiting in {wchan or '-'}")


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 30.0) -> None:
    """Block until ``url`` answers 200 (a supervisor: every worker up), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{program(proc)} exited with {proc.returncode} before healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:          # URLError and HTTPError (503 while starting) included
            pass
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s")


class TryAgain(Exception):
    """The relay refused a connection with ``TRY_AGAIN``; come back after ``delay`` seconds."""

    def __init__(self, delay: float, advice: str) -> None:
        super().__init__(advice)
        self.delay = delay


@dataclass(frozen=True)
class Wire:
    """Byte layout of one channel's traffic in a run.

    ``publish`` is one complete publish frame whose payload holds the stamp
    at ``publish_stamp``; a subscriber receives frames of ``delivery_size``
    bytes with the stamp at ``delivery_stamp``.  The publisher's link brings
    back ``reply_per_publish`` bytes per publish (an ack, its own echo), and
    ``trailer_reply`` bytes for each ``batch_trailer`` written after a batch
    (NATS has no per-publish ack, so a batch ends with PING and waits for
    PONG).
    """

    publish: bytes
    publish_stamp: int
    delivery_size: int
    delivery_stamp: int
    reply_per_publish: int
    batch_trailer: bytes = b""
    trailer_reply: int = 0
    publish_key: int = -1       # offset of an 8-byte idempotency key made unique per publish
    random_keys: bool = False   # those keys in no order (else counted up)


@dataclass
class Opened:
    """A link whose handshake is done (``Target.open``), not yet handed to the generator.

    ``quiet`` is False while the server still owes the link an unsolicited
    frame, which ``Target.settle`` waits for and answers.
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    quiet: bool = True


class Target(ABC):
    """A relay under test: a server process plus how to talk to it."""

    name: str
    host = "127.0.0.1"
    #: seconds the server may take to listen (a cluster node across slow
    #: routes sets up its stream and buckets first)
    start_timeout = 15.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def server_pids(self) -> list[int]:
        """Every process whose CPU time is the server's (the one process here)."""
        return [self.pid]

    @abstractmethod
    def start(self, workdir: Path) -> None:
        """Start the server (pinned to ``RELAY_CPU``) and wait until it listens."""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _spawn(self, cmd: list[str], cpu: int | None = RELAY_CPU, **kwargs) -> None:
        """Start ``cmd`` pinned to ``cpu`` (None: not pinned), to get SIGTERM when
        this process dies, SIGKILL included (``die_with``): a bench killed mid-run
        leaves no server holding its port and CPU."""
        dies = die_with(os.getpid())

        def preexec() -> None:
            dies()
            if cpu is not None:
                pin(cpu)
        # preexec_fn is safe here: the generator spawns servers before it has threads.
        self.proc = subprocess.Popen(cmd, preexec_fn=preexec,  # noqa: PLW1509
                                     stdout=subprocess.DEVNULL, **kwargs)
        wait_listening(self.proc, self.host, self.port, self.start_timeout)

    @abstractmethod
    def direct(self, a: str, b: str) -> str:
        """The channel on which ``a`` sends to ``b``."""

    @abstractmethod
    def group(self, name: str) -> str:
        """The channel of a group called ``name``."""

    async def create_group(self, channel: str, owner: str, members: list[str]) -> None:
        """Make ``members`` receive ``channel`` (pub/sub peers need nothing)."""

    @abstractmethod
    async def open(self, user: str, subscribe: tuple[str, ...] = (),
                   source: str | None = None) -> Opened:
        """An authenticated link for ``user`` receiving ``subscribe``, opened as the
        peer's own client library opens one: the handshake's round trip is done
        and the link may publish.  This is the connect the ``connections``
        scenario times.
        """

    def prepare(self, users: list[str]) -> None:
        """Make beforehand what each of ``users`` brings to its handshake.

        A client holds its credentials before it connects (a fenghuo token
        from the application's backend, a Redis password from its
        configuration): making them is not part of a connect, and a
        generator that makes them as it connects paces the server with its
        own cost (``connections_run`` calls this before its clock starts).
        """

    async def settle(self, link: Opened) -> None:
        """Return once the server will send nothing unasked on ``link``.

        Most servers never do; nats-server owes every new client a first
        keep-alive PING (``bench/peers/nats.py``).
        """

    async def connect(self, user: str, subscribe: tuple[str, ...] = (),
                      source: str | None = None) -> asyncio.StreamWriter:
        """``open`` then ``settle``: a link quiet on return, for ``Link.attach``."""
        link = await self.open(user, subscribe, source)
        try:
            await self.settle(link)
        except BaseException:
            link.writer.close()  # do not leave the socket to the collector
            raise
        return handed_over(link.reader, link.writer)

    @abstractmethod
    def wire(self, channel: str, sender: str, payload: int, subscribers: int = 1) -> Wire:
        """The byte layout of ``sender`` publishing ``payload``-byte messages on ``channel``.

        ``subscribers`` is how many links receive the channel (Redis's reply
        to PUBLISH is that count).
        """


# Linux's IP_BIND_ADDRESS_NO_PORT (24; Python names it from 3.12 on).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def open_stream(host: str, port: int, source: str | None, tls: ssl.SSLContext | None = None):
    """A stream to ``host:port``, from the address ``source`` if given.

    Bound to ``source`` with IP_BIND_ADDRESS_NO_PORT, so the port is chosen
    at connect() for the whole 4-tuple: bind() choosing it alone searches
    the kernel's port table for one no socket holds, which slows every
    connection as tens of thousands are held (with 100,000 connections over
    12 source addresses the generators spent most of their time in bind).
    """
    if not source:
        return await asyncio.open_connection(host, port, ssl=tls)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, ssl=tls,
                                         server_hostname=host if tls is not None else None)


def handed_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """The stream, checked to hold no unread bytes, ready for ``Link.attach``.

    The writer itself is handed on, not just its transport: a StreamWriter
    closes its transport when it is garbage-collected.
    """
    # _buffer: asyncio's StreamReader has no public count of what it holds unread.
    unread = len(reader._buffer)  # type: ignore[attr-defined]
    if unread:
        raise RuntimeError(f"{unread} unread bytes at hand-over")
    return writer


class FenghuoWire(Target):
    """fenghuo's protocol v1: shared by fenghuo itself and the asyncio baseline."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        #: the client TLS context when the server speaks TLS
        self.tls: ssl.SSLContext | None = None
        #: group channel -> the seq of its "created" event (``create_group``):
        #: a member's HELLO says it has that far, so the relay owes the new link
        #: no catch-up (which could arrive with the WELCOME, before the hand-over)
        self.heads: dict[str, int] = {}
        #: user -> a token issued beforehand (``prepare``)
        self.tokens: dict[str, str] = {}

    def prepare(self, users: list[str]) -> None:
        for user in users:
            self.tokens[user] = issue_token(self.secret, user)

    def token(self, user: str) -> str:
        """``user``'s token: the one made by ``prepare``, else a new one."""
        return self.tokens.get(user) or issue_token(self.secret, user)

    def direct(self, a: str, b: str) -> str:
        return f"dm:{a}:{b}" if a < b else f"dm:{b}:{a}"

    def group(self, name: str) -> str:
        return f"group:{name}"

    def address_of(self, user: str) -> tuple[str, int]:
        """Where ``user`` connects: the one server here; a cluster places users on its nodes."""
        return self.host, self.port

    async def _stream(self, source: str | None, user: str = ""):
        """A new connection's ``(reader, writer)`` for ``user``: TCP, or TLS when ``self.tls`` is set."""
        return await open_stream(*self.address_of(user), source, self.tls)

    async def _frames(self, reader, frames: FrameReader, what: str) -> AsyncIterator[Frame]:
        """The frames arriving on ``reader`` during setup step ``what``, for as long as asked."""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 30)
            if not chunk:
                raise ConnectionError(f"{self.name} closed during {what}")
            for frame in frames.feed(chunk):
                yield frame

    async def _request(self, reader, writer, ftype: int, body: dict, rid: int) -> dict:
        writer.write(encode_json(ftype, body, rid))
        frames = FrameReader()
        async for frame in self._frames(reader, frames, FrameType(ftype).name):
            if frame.type == FrameType.ERROR:
                code, text = decode_error(frame.body)
                if code == ErrorCode.TRY_AGAIN:
                    raise TryAgain(try_again_delay(text), text)
                raise RuntimeError(f"{self.name} refused {FrameType(ftype).name}: {frame.body!r}")
            if frame.request_id == rid:
                if frames.buffered:
                    raise RuntimeError("bytes after the reply during setup")
                return decode_json(frame.body)
        raise AssertionError("unreachable: _frames ends only by raising")

    async def open(self, user: str, subscribe: tuple[str, ...] = (),
                   source: str | None = None) -> Opened:
        reader, writer = await self._stream(source, user)
        try:
            hello: dict = {"token": self.token(user)}
            known = {c: self.heads[c] for c in subscribe if c in self.heads}
            if known:
                hello["positions"] = known
            await self._request(reader, writer, FrameType.HELLO, hello, 1)
            # Members receive their direct and group channels without subscribing.
            org = [c for c in subscribe if not c.startswith(("dm:", "group:"))]
            for rid, channel in enumerate(org, 2):
                await self._request(reader, writer, FrameType.SUBSCRIBE, {"channel": channel}, rid)
            return Opened(reader, writer)
        except BaseException:
            writer.close()       # refused or failed: do not leave the socket to the collector
            raise

    async def create_group(self, channel: str, owner: str, members: list[str]) -> None:
        """Create the group, and return once its "created" event has reached the owner.

        The relay answers GROUP before it delivers the event (a durable relay
        delivers once the event is committed), so a member linking in that
        interval would be sent the event live, whatever its HELLO's
        positions, and hold it unread at the hand-over (CI on bc9466c: 308
        bytes).  Once the owner's link has it, every member already has it too.
        """
        reader, writer = await self._stream(None, owner)
        try:
            await self._request(reader, writer, FrameType.HELLO,
                                {"token": issue_token(self.secret, owner)}, 1)
            writer.write(encode_json(FrameType.GROUP, {"op": "create",
                                                       "group": channel.removeprefix("group:"),
                                                       "members": members}, 2))
            created: dict | None = None
            delivered = 0                   # the highest seq of ``channel`` the owner received
            async for frame in self._frames(reader, FrameReader(), "GROUP"):
                if frame.type == FrameType.ERROR:
                    raise RuntimeError(f"{self.name} refused GROUP: {frame.body!r}")
                if frame.type == FrameType.MESSAGE:
                    message = decode_message(frame.body)
                    if message.channel == channel:
                        delivered = max(delivered, message.seq)
                elif frame.request_id == 2:
                    created = decode_json(frame.body)
                if created is not None and delivered >= created.get("seq", 0):
                    break
            assert created is not None
            if "seq" in created:        # fenghuo's (the asyncio baseline keeps no seqs)
                self.heads[channel] = created["seq"]
        finally:
            writer.close()

    def wire(self, channel: str, sender: str, payload: int, subscribers: int = 1,
             keyed: bool = False, random_keys: bool = False) -> Wire:
        """As :meth:`Target.wire`; ``keyed`` gives every publish an 8-byte idempotency key
        of its own: the generator counts it up, so a sender's keys grow as the
        Python client's do (milliseconds first), or with ``random_keys``
        scatters the count (unique keys in no order, as random ones)."""
        body = bytes(payload)
        key = b"\xa5" * STAMP_SIZE if keyed else b""
        publish = encode_publish(channel, body, key=key)
        delivery = len(encode_message(channel, 1, 0, sender, body, key=key))
        # The sender is a member of its channel: per publish its ACK and its own MESSAGE.
        return Wire(publish, len(publish) - STAMP_SIZE, delivery, delivery - STAMP_SIZE,
                    len(encode_ack(0, channel, 1, 0)) + delivery,
                    publish_key=publish.find(key) if keyed else -1, random_keys=random_keys)


class Fenghuo(FenghuoWire):
    """``fenghuo serve --workers W`` with the flood limits lifted and ``relay_flags`` added.

    ``workers`` is always passed, the server's own default being one per
    core: with 1 it is one process, pinned like every peer.  With more it is
    a supervisor of that many worker processes: they are not pinned (they
    share the machine's cores with each other, and the kernel places them
    better than one fixed CPU would), its metrics port
    is followed by one free port per worker (``metrics_port + 1 + k``), its
    log goes to ``workdir/relay.log``, it gets its own process group, and
    ``start`` returns once its ``/healthz`` says every worker is up.
    """

    name = "fenghuo"

    def __init__(self, secret: str, relay_flags: tuple[str, ...] = (), workers: int = 1,
                 tls: bool = False, ws: bool = False, gateway: bool = False) -> None:
        super().__init__(secret)
        self.relay_flags = relay_flags
        self.metrics_port = 0
        self.workers = workers
        #: serve TLS with a self-signed certificate made in the workdir (``bench tls``)
        self.use_tls = tls
        #: the gateway's port when it is served (``gateway``, or ``ws``: the links
        #: are WebSockets to it, ``bench ws``)
        self.ws_port = 0
        self.use_ws = ws
        self.gateway = gateway or ws
        self.name = "fenghuo" + ("-tls" if tls else "") + ("-ws" if ws else "")
        #: ``--log-level`` of the relay
        self.log_level = "warning"
        #: the CPU one worker is pinned to (None: not pinned)
        self.cpu: int | None = RELAY_CPU
        #: where one worker's log goes (this process's stderr if None; several
        #: workers' always to ``workdir/relay.log``)
        self.log_path: Path | None = None
        #: the interpreter that runs it and the directory it runs in: another
        #: checkout's (``<checkout>/.venv/bin/python`` in ``<checkout>``) runs that
        #: checkout's build (``bench cluster --parts restart --restart-builds``)
        self.python = sys.executable
        self.cwd: Path | None = None

    async def _stream(self, source: str | None, user: str = ""):
        if not self.use_ws:
            return await super()._stream(source, user)
        from bench.ws_stream import open_ws_stream
        scheme = "wss" if self.tls is not None else "ws"
        return await open_ws_stream(f"{scheme}://{self.host}:{self.ws_port}/", self.tls)

    def _tls_flags(self, workdir: Path) -> tuple[str, ...]:
        """A self-signed P-256 certificate for 127.0.0.1, trusted by this generator."""
        cert, key = workdir / "tls.pem", workdir / "tls.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                        "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        self.tls = ssl.create_default_context(cafile=str(cert))
        return ("--tls-cert", str(cert), "--tls-key", str(key))

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_ports(self.workers + 1) if self.workers > 1 else free_port()
        cmd = [self.python, "-m", "fenghuo", "serve", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--data-dir", str(workdir),
               f"--secret={self.secret}", "--rate", "1e12", "--burst", "1e12",
               "--log-level", self.log_level, "--workers", str(self.workers), *self.relay_flags,
               *(self._tls_flags(workdir) if self.use_tls else ())]
        if self.gateway:
            self.ws_port = free_port()
            cmd += ["--ws-port", str(self.ws_port)]
        if self.workers == 1:
            if self.log_path is None:
                self._spawn(cmd, cpu=self.cpu, cwd=self.cwd)
            else:
                with open(self.log_path, "ab") as log:
                    self._spawn(cmd, cpu=self.cpu, stderr=log, cwd=self.cwd)
            if self.gateway:
                assert self.proc is not None        # _spawn set it
                wait_listening(self.proc, self.host, self.ws_port)
            return
        # Not pinned: the workers spread over the cores. The supervisor gets
        # SIGTERM if this process dies (_spawn), its workers get it from it.
        with open(workdir / "relay.log", "ab") as log:
            self._spawn(cmd, cpu=None, stderr=log, start_new_session=True)
        assert self.proc is not None
        wait_healthy(self.proc, f"http://{self.host}:{self.metrics_port}/healthz")

    def worker_pids(self) -> list[int]:
        """The running workers' pids, from the supervisor's ``/healthz`` (one worker: itself)."""
        if self.workers == 1:
            return [self.pid]
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/healthz",
                                    timeout=10) as answer:
            health = json.loads(answer.read())
        return [w["pid"] for w in health["workers"] if w["running"]]

    def server_pids(self) -> list[int]:
        """The workers and, with several, their supervisor."""
        return self.worker_pids() if self.workers == 1 else [self.pid, *self.worker_pids()]

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a supervisor drains its workers), then SIGKILL whatever is left of its group."""
        if self.workers == 1 or self.proc is None:
            super().stop()
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass                 # the group is gone: every worker has exited
        self.proc.wait()


class AsyncioBaseline(FenghuoWire):
    """The plain-asyncio baseline peer (``bench/peers/asyncio_relay.py``)."""

    name = "asyncio"

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self._spawn([sys.executable, "-m", "bench.peers.asyncio_relay",
                     "--port", str(self.port), f"--secret={self.secret}"])


class Echo(Target):
    """A trivial echo server: the generator's own ceiling.

    A publish comes straight back to its publisher, so the publisher's link
    is also where deliveries are counted and stamped.
    """

    name = "echo"

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self._spawn([sys.executable, "-m", "bench.peers.echo", "--port", str(self.port)])

    def direct(self, a: str, b: str) -> str:
        return f"{a}.{b}"

    def group(self, name: str) -> str:
        return name

    async def open(self, user: str, subscribe: tuple[str, ...] = (),
                   source: str | None = None) -> Opened:
        return Opened(*await open_stream(self.host, self.port, source))

    def wire(self, channel: str, sender: str, payload: int, subscribers: int = 1) -> Wire:
        publish = encode_publish(channel, bytes(payload))
        stamp = len(publish) - STAMP_SIZE
        return Wire(publish, stamp, len(publish), stamp, len(publish))


class UvloopFloor(Echo):
    """The uvloop floor of a connect: accept, one read, one fixed line written
    (``bench/peers/echo.py --reply``), no protocol, no authentication."""

    name = "uvloop-floor"
    line = "+OK"

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self._spawn([sys.executable, "-m", "bench.peers.echo", "--port", str(self.port),
                     "--reply", self.line])


def peer_binary(name: str) -> str | None:
    """Path of a peer server binary (``nats-server``, ``redis-server``) or None."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
