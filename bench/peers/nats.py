"""nats-server core pub/sub as a benchmark peer.

The server runs on a free loopback port with its slow-consumer cut-offs
raised, so that a run measures how fast it delivers rather than whom it
drops.  Links speak the text protocol directly: ``CONNECT`` without
verbose ``+OK`` replies and without echo of a link's own publishes, one
``SUB`` per channel with a fixed-width sid (every ``MSG`` of one subject then
has one size), and a ``PING``/``PONG`` round trip that proves the
subscriptions are registered.

``open`` connects as nats.py and the other official clients do: read
``INFO``, send ``CONNECT`` (with the ``SUB``s) and a ``PING``, and the
``PONG`` says the server has processed them; this is the connect the
``connections`` scenario times.

nats-server sends its first keep-alive ``PING`` about 2 s after a client
connects (``firstClientPingInterval`` plus up to 20 % jitter), whatever
``ping_interval`` says; 2.9 has no option to turn it off.  A client
library answers it in the background; the generator cannot, since it
counts bytes and never parses while it measures.  So ``settle`` waits for
that ``PING`` and answers it before a link is handed over, which takes up
to 2.4 s per link (runs open many concurrently).  The next ``PING`` comes
after ``ping_interval`` (an hour), far beyond any run.  Until 2026-12 the
suite timed ``settle`` as part of the connect, which capped nats-server at
about 1,000 links per 2.3 s (429/s).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bench.peers.pubsub import CRLF, SETUP_TIMEOUT, PubSubPeer, crlf_wire, payload_body
from bench.targets import Opened, Wire, free_port, open_stream

SID_WIDTH = 6
"""Digits of every sid, so a delivery's size does not depend on its sid."""

CONNECT_OPTIONS = {
    "verbose": False,  # no +OK after every command
    "pedantic": False,
    "echo": False,  # a link that also subscribes never gets its own publishes back
    "lang": "python",
    "version": "fenghuo-bench",
}

PING, PONG = b"PING\r\n", b"PONG\r\n"


def server_config(workdir: Path) -> str:
    """The nats-server configuration for a run, logging into ``workdir``."""
    # max_pending (default 64 MiB) and write_deadline (default 10 s) decide
    # when a subscriber counts as slow and is disconnected; a cut subscriber
    # would stop a run's byte counts, so both are far above what a run holds.
    return "\n".join([
        "max_pending: 1GB",
        'write_deadline: "5m"',
        # Keep-alive PINGs after the first one: never within a run.
        'ping_interval: "1h"',
        f"logfile: {json.dumps(str(workdir / 'nats-server.log'))}",
        "",
    ])


def _subject(channel: str) -> str:
    if not channel or any(c.isspace() for c in channel):
        raise ValueError(f"not a NATS subject: {channel!r}")
    return channel


class Nats(PubSubPeer):
    """nats-server 2.x core pub/sub (no JetStream) on loopback."""

    name = "nats"
    binary = "nats-server"

    def start(self, workdir: Path) -> None:
        config = workdir / "nats-server.conf"
        config.write_text(server_config(workdir))
        self.port = free_port()
        self._spawn([self.executable(), "-c", str(config), "-a", self.host, "-p", str(self.port)])

    def direct(self, a: str, b: str) -> str:
        return _subject(f"dm.{a}.{b}" if a < b else f"dm.{b}.{a}")

    def group(self, name: str) -> str:
        return _subject(f"group.{name}")

    async def open(self, user: str, subscribe: tuple[str, ...] = (),
                   source: str | None = None) -> Opened:
        """A link subscribed to ``subscribe``, ready as a client's (see the module docstring)."""
        reader, writer = await open_stream(self.host, self.port, source)
        try:
            pinged = await asyncio.wait_for(self._handshake(reader, writer, subscribe),
                                            SETUP_TIMEOUT)
        except BaseException:
            writer.close()
            raise
        return Opened(reader, writer, quiet=pinged)

    async def settle(self, link: Opened) -> None:
        """Wait for the server's first keep-alive PING and answer it."""
        if not link.quiet:
            line = await asyncio.wait_for(link.reader.readline(), SETUP_TIMEOUT)
            if line != PING:
                raise ConnectionError(f"nats-server sent {line[:200]!r}, not its first PING")
            link.writer.write(PONG)
            link.quiet = True

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         subscribe: tuple[str, ...]) -> bool:
        """CONNECT, SUBs and PING, until PONG; whether the server's first PING came meanwhile."""
        info = await reader.readline()
        if not info.startswith(b"INFO "):
            raise ConnectionError(f"nats-server greeted with {info[:80]!r}, not INFO")
        channels = tuple(dict.fromkeys(subscribe))
        if len(channels) >= 10 ** SID_WIDTH:
            raise ValueError(f"at most {10 ** SID_WIDTH - 1} subscriptions per link")
        subs = "".join(f"SUB {_subject(channel)} {sid:0{SID_WIDTH}d}\r\n"
                       for sid, channel in enumerate(channels, 1))
        writer.write(f"CONNECT {json.dumps(CONNECT_OPTIONS)}\r\n{subs}".encode() + PING)
        # Our PONG proves the SUBs are in place; the server's first PING may
        # come before it when the server is slow to read a crowd of connects.
        pinged = False
        while True:
            line = await reader.readline()
            if line == PONG:
                return pinged
            if line == PING:
                pinged = True
                writer.write(PONG)
            else:
                raise ConnectionError(f"nats-server answered {line[:200]!r} during setup")

    def wire(self, channel: str, sender: str, payload: int, subscribers: int = 1) -> Wire:
        """``PUB`` frames; deliveries are ``MSG`` frames; a batch ends with PING/PONG."""
        subject, body = _subject(channel).encode(), payload_body(payload) + CRLF
        publish = b"PUB %s %d\r\n" % (subject, payload) + body
        delivery = b"MSG %s %s %d\r\n" % (subject, b"0" * SID_WIDTH, payload) + body
        return crlf_wire(publish, len(delivery), reply_per_publish=0,
                         batch_trailer=PING, trailer_reply=len(PONG))
