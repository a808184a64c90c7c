"""Fixtures: real ``fenghuo serve`` processes on loopback, and clients for them.

Every integration test talks to a server started as a subprocess exactly as a
user would start it (``python -m fenghuo serve ...``), over real TCP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fenghuo.server.supervisor import die_with

import fenghuo
from bench.targets import READY_POLL_S, free_port, free_ports, wait_healthy, wait_listening
from scripts.nats_cluster import NatsCluster
from fenghuo.tokens import issue_token

STOP_TIMEOUT = 20.0     # a supervisor gives its workers the drain timeout + 5 s


@dataclass
class RelayProcess:
    """A running ``fenghuo serve`` subprocess."""

    proc: subprocess.Popen
    host: str
    port: int
    metrics_port: int
    secret: str
    data_dir: Path
    log_path: Path
    workers: int                # 1: ``proc`` is the relay; more: ``proc`` is their supervisor
    clients: list = field(default_factory=list)
    raw: list = field(default_factory=list)     # rawwire.open_raw's connections to it
    api_port: int = 0           # the server API's port (``start_relay(api=True)``)
    api_key: str = ""

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def server(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def token(self, user: str, **claims: Any) -> str:
        return issue_token(self.secret, user, **claims)

    def client(self, user: str, *, channels: tuple[str, ...] = (), read: tuple[str, ...] = (),
               roles: tuple[str, ...] = (), presence: bool = False,
               **kwargs: Any) -> fenghuo.Client:
        """A client for ``user`` (not yet connected: ``await c.connect()``);
        ``presence``: its token may see every user's presence."""
        client = fenghuo.Client(self.server, token=self.token(
            user, channels=channels, read=read, roles=roles, presence=presence), **kwargs)
        self.clients.append(client)
        return client

    async def connect(self, user: str, **kwargs: Any) -> fenghuo.Client:
        return await self.client(user, **kwargs).connect()

    def log(self, since: int = 0) -> str:
        """What the relay wrote to its log, from byte ``since`` on."""
        return self.log_path.read_bytes()[since:].decode(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, SIGKILL after ``timeout``; its exit status once none of its processes is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """``kill -9`` of the relay: all its processes (a supervisor and its workers) at once."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := group_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not left, f"processes of the relay outlived SIGKILL: {left}"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            if int(pgrp) == pgid and state != "Z":
                pids.append(int(entry.name))
    return pids


class PortTaken(RuntimeError):
    """The relay could not listen: a port :func:`free_port` found free was taken
    before the relay bound it (another test process, a server just started)."""


def start_relay(tmp_path: Path, *flags: str, host: str = "127.0.0.1",
                env: dict[str, str] | None = None, timeout: float = 30.0,
                data_dir: Path | None = None, secret: str | None = None,
                workers: int | None = None, api: bool = False) -> RelayProcess:
    """Start ``fenghuo serve``; pass ``data_dir`` and ``secret`` of an earlier one to restart it.

    ``workers`` None keeps the server's default (one per core).  It returns
    once the relay accepts: with several workers, once the supervisor's
    ``/healthz`` says every one of them does.  The relay gets a process
    group of its own (:meth:`RelayProcess.kill` takes all its processes) and
    SIGTERM should this process die.  ``api`` turns on the server API with
    one key (``relay.api_url``, ``relay.api_key``).  A port taken between
    choosing it and binding it is chosen again (twice at most): the ports this
    function picks, not those in ``flags``.
    """
    for attempt in range(3):
        try:
            return _start_relay(tmp_path, *flags, host=host, env=env, timeout=timeout,
                                data_dir=data_dir, secret=secret, workers=workers, api=api)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_relay(tmp_path: Path, *flags: str, host: str, env: dict[str, str] | None,
                 timeout: float, data_dir: Path | None, secret: str | None,
                 workers: int | None, api: bool) -> RelayProcess:
    count = workers or os.cpu_count() or 1
    port = free_port(host)
    # Worker k serves its own /metrics on the supervisor's metrics port + 1 + k.
    # Each pick only knows the ports bound at the time, so the block could hold
    # the client port just picked (the relay then refuses: "--port N is a
    # worker's metrics port"; seen in a CI run on 2026-12-06): pick again.
    metrics_port = port
    while metrics_port <= port < metrics_port + count + 1:
        metrics_port = free_ports(count + 1, host) if count > 1 else free_port(host)
    secret = secret or secrets.token_urlsafe(32)
    data_dir = data_dir or tmp_path / f"data-{port}"
    log_path = tmp_path / f"relay-{port}.log"
    cmd = [sys.executable, "-m", "fenghuo", "serve", "--host", host, "--port", str(port),
           "--metrics-port", str(metrics_port), "--data-dir", str(data_dir),
           f"--secret={secret}", "--log-level", "debug",
           *(("--workers", str(workers)) if workers is not None else ()), *flags]
    api_port, api_key = 0, ""
    if api:
        api_port, api_key = port, secrets.token_urlsafe(24)
        while api_port == port or metrics_port <= api_port < metrics_port + count + 1:
            api_port = free_port(host)
        key_file = tmp_path / f"api-keys-{port}"
        key_file.write_text(f"# one key a line\n{api_key}\n")
        cmd += ["--api-port", str(api_port), "--api-key-file", str(key_file)]
    with open(log_path, "wb") as log_file:
        # preexec_fn is safe: the test process starts relays from its main thread.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=die_with(os.getpid()))  # noqa: PLW1509
    relay = RelayProcess(proc, host, port, metrics_port, secret, data_dir, log_path, count,
                         api_port=api_port, api_key=api_key)
    try:
        if count > 1:
            wait_healthy(proc, f"http://{host}:{metrics_port}/healthz", timeout)
        else:
            # One process opens the client port before its metrics port
            # (server/main.py serve): a test may connect and read /metrics at once.
            wait_listening(proc, host, port, timeout)
            wait_listening(proc, host, metrics_port, timeout)
        if api_port:
            wait_api(proc, log_path, api_port, timeout)
    except RuntimeError:
        exited = proc.poll()
        relay.kill()
        why = "did not start" if exited is None else f"exited with {exited}"
        log_text = log_path.read_text()
        if exited is not None and "address already in use" in log_text.lower():
            raise PortTaken(f"relay {why}:\n{log_text}") from None
        raise RuntimeError(f"relay {why}:\n{log_text}") from None
    return relay


def wait_api(proc: subprocess.Popen, log_path: Path, api_port: int, timeout: float) -> None:
    """Block until the relay says its API listens on ``api_port`` (the line it prints
    once every server of it is up), or fail with its fate.

    Not a connect to the port: another process that took the port between
    :func:`free_port` and the relay's bind answers that too (a relay's
    metrics server did, with a plain-text 404 to every API call), while this
    relay exits with "address already in use"."""
    said = re.compile(rf"API on \S+:{api_port}$", re.MULTILINE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if said.search(log_path.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before its API listened")
        time.sleep(READY_POLL_S)
    raise RuntimeError(f"the API did not listen on {api_port} within {timeout:g} s")


@pytest.fixture
async def relay_factory(tmp_path: Path) -> AsyncIterator[Callable[..., RelayProcess]]:
    """Start relays with extra flags: ``relay_factory("--ring-size", "8")``.

    At teardown the Python clients made through them are closed (their
    reconnect loops must not outlive the test's event loop), then the relays
    are stopped.
    """
    started: list[RelayProcess] = []

    def factory(*flags: str, **kwargs: Any) -> RelayProcess:
        relay = start_relay(tmp_path, *flags, **kwargs)
        started.append(relay)
        return relay

    yield factory
    await asyncio.gather(*(c.close() for r in started for c in r.clients),
                         return_exceptions=True)
    for relay in started:
        relay.stop()


@pytest.fixture
async def relay(relay_factory: Callable[..., RelayProcess]) -> AsyncIterator[RelayProcess]:
    """A relay with default settings."""
    r = relay_factory()
    yield r
    assert r.proc.poll() is None, f"relay died during the test:\n{r.log()}"
    # A supervisor restarts a dead worker, which would hide the death.
    assert "worker exited" not in r.log(), f"a worker died during the test:\n{r.log()}"


def serve_for_module(tmp_path_factory: pytest.TempPathFactory, **kwargs: Any
                     ) -> Iterator[RelayProcess]:
    """The body of a module-scoped relay fixture (``module_relay``): one relay,
    started with ``start_relay(**kwargs)``, for all the tests of a module that
    use :func:`shared_relay`, stopped after the last of them."""
    relay = start_relay(tmp_path_factory.mktemp("module-relay"), **kwargs)
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def module_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A default relay shared by a module's tests (through :func:`shared_relay`);
    a module overrides it to share another deployment (``serve_for_module``)."""
    yield from serve_for_module(tmp_path_factory)


@pytest.fixture
async def shared_relay(module_relay: RelayProcess) -> AsyncIterator[RelayProcess]:
    """The module's relay, for a test that needs no pristine server.

    Starting a relay is most of what a short test costs (about 0.5-1 s of the
    default deployment's start, bench/results/2026-12-07-cispeed), so the
    tests that only send their own users' requests share one.  Such a test
    must not depend on what earlier tests did to the relay: it names every
    user, group and channel it uses with :func:`unique` (``names``), and it
    neither counts a relay-wide metric, nor stops, kills or reconfigures the
    relay; a test that does any of that keeps ``relay`` (a fresh one).

    The clients and raw connections the test made are closed at its end, and
    the relay must still be alive with no worker dead since the test began.
    """
    relay = dataclasses.replace(module_relay, clients=[], raw=[])
    log_start = relay.log_path.stat().st_size
    yield relay
    await asyncio.gather(*(c.close() for c in relay.clients), return_exceptions=True)
    for conn in relay.raw:
        conn.close()
    assert relay.proc.poll() is None, f"the shared relay died during the test:\n{relay.log()}"
    since = relay.log(since=log_start)
    assert "worker exited" not in since, f"a worker died during the test:\n{since}"


_test_serial = itertools.count(1)


@pytest.fixture
def names() -> Callable[[str], str]:
    """``names("alice")``: a user, group or channel segment of this test's own
    (``alice-t17``), so that tests sharing a relay (``shared_relay``) never meet
    in one user's connections, one channel's history or one group."""
    suffix = f"t{next(_test_serial)}"
    return lambda name: f"{name}-{suffix}"


@pytest.fixture(params=[1, None], ids=["workers-1", "workers-default"])
async def api_relay(request: pytest.FixtureRequest,
                    relay_factory: Callable[..., RelayProcess]) -> AsyncIterator[RelayProcess]:
    """A relay with its server API on (docs/API.md), under one worker and the default."""
    relay = relay_factory("--api-max-body", "65536", api=True, workers=request.param)
    yield relay
    assert relay.proc.poll() is None, f"relay died during the test:\n{relay.log()}"
    assert "worker exited" not in relay.log(), f"a worker died:\n{relay.log()}"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-servers with JetStream on loopback (scripts/nats_cluster.py), stopped after."""
    cluster = NatsCluster.start(tmp_path / "nats")
    yield cluster
    cluster.stop()


async def raw_connection(relay: RelayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare TCP connection, for speaking (or breaking) the protocol by hand."""
    return await asyncio.open_connection(relay.host, relay.port)


async def read_frame(reader: asyncio.StreamReader, timeout: float = 5.0):
    """Read exactly one frame with the compiled decoder; None at EOF."""
    from fenghuo.core import FrameReader

    decoder = FrameReader()
    header = await asyncio.wait_for(reader.read(4), timeout)
    if not header:
        return None
    while len(header) < 4:
        header += await asyncio.wait_for(reader.readexactly(4 - len(header)), timeout)
    rest = await asyncio.wait_for(reader.readexactly(int.from_bytes(header, "big")), timeout)
    (frame,) = decoder.feed(header + rest)
    return frame
