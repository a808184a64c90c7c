"""Fixtures: real ``fenghuo serve`` processes on loopback, and clients for them.

Every integration test talks to a server started as a subprocess exactly as a
user would start it (``python -m fenghuo serve ...``), over real TCP.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

import fenghuo
from bench.targets import free_port
from fenghuo.tokens import issue_token


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
    clients: list = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def token(self, user: str, **claims: Any) -> str:
        return issue_token(self.secret, user, **claims)

    def client(self, user: str, *, channels: tuple[str, ...] = (), read: tuple[str, ...] = (),
               roles: tuple[str, ...] = (), **kwargs: Any) -> fenghuo.Client:
        """A client for ``user`` (not yet connected: ``await c.connect()``)."""
        client = fenghuo.Client(self.server, token=self.token(
            user, channels=channels, read=read, roles=roles), **kwargs)
        self.clients.append(client)
        return client

    async def connect(self, user: str, **kwargs: Any) -> fenghuo.Client:
        return await self.client(user, **kwargs).connect()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_relay(tmp_path: Path, *flags: str, host: str = "127.0.0.1",
                env: dict[str, str] | None = None, timeout: float = 15.0,
                data_dir: Path | None = None, secret: str | None = None) -> RelayProcess:
    """Start ``fenghuo serve``; pass ``data_dir`` and ``secret`` of an earlier one to restart it."""
    port, metrics_port = free_port(host), free_port(host)
    secret = secret or secrets.token_urlsafe(32)
    data_dir = data_dir or tmp_path / f"data-{port}"
    log_path = tmp_path / f"relay-{port}.log"
    cmd = [sys.executable, "-m", "fenghuo", "serve", "--host", host, "--port", str(port),
           "--metrics-port", str(metrics_port), "--data-dir", str(data_dir),
           f"--secret={secret}", "--log-level", "debug", *flags]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    log_file.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"relay did not start:\n{log_path.read_text()}")
    return RelayProcess(proc, host, port, metrics_port, secret, data_dir, log_path)


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
