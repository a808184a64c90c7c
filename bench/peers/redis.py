"""redis-server pub/sub as a benchmark peer.

The server runs on a free loopback port as a pure pub/sub broker: no
snapshots, no append-only file, and no output-buffer limit for pub/sub
clients.  Links speak RESP2 directly, and authenticate as a Redis client
configured with a password does: ``AUTH <password>``, answered ``+OK``
(``requirepass``, the default user's password, which Redis checks against its
SHA-256 on every AUTH), as fenghuo checks a token's HMAC-SHA256 on every
HELLO.  A link is either a subscriber or a
publisher, never both: in RESP2 a connection that has subscribed may send
only (P)SUBSCRIBE, (P)UNSUBSCRIBE, PING, QUIT and RESET, so a publisher is a
link connected with no subscriptions.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from bench.peers.pubsub import SETUP_TIMEOUT, PubSubPeer, crlf_wire, payload_body
from bench.targets import Opened, Wire, free_port, open_stream

MAX_CLIENTS = 19000
"""Below this machine's 20,000 open files: redis keeps 32 descriptors for itself."""


def resp(*parts: bytes) -> bytes:
    """``parts`` as a RESP array of bulk strings (a command, or a pushed message)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def subscribed(channel: bytes, count: int) -> bytes:
    """Redis's confirmation of a SUBSCRIBE to ``channel``, the link's ``count``-th."""
    return b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:%d\r\n" % (len(channel), channel, count)


class Redis(PubSubPeer):
    """redis-server 7 pub/sub (SUBSCRIBE/PUBLISH) on loopback."""

    name = "redis"
    binary = "redis-server"

    def __init__(self) -> None:
        super().__init__()
        self.password = secrets.token_urlsafe(24)
        #: what a link sends first, as redis-py, ioredis or node-redis (RESP2) do
        #: when given a password: the connect of ``python -m bench run connections``
        self.auth = resp(b"AUTH", self.password.encode())

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        self._spawn([
            self.executable(), "--bind", self.host, "--port", str(self.port), "--protected-mode", "no",
            "--requirepass", self.password,
            # A broker, not a store: nothing is written to disk during a run.
            "--save", "", "--appendonly", "no",
            "--maxclients", str(MAX_CLIENTS),
            # The default (pubsub 32mb 8mb 60) disconnects a subscriber that
            # falls behind; a cut subscriber would stop a run's byte counts.
            # A run is bounded (at most 2 minutes, a window of publishes in
            # flight), so what a slow subscriber holds stays bounded too.
            "--client-output-buffer-limit", "pubsub 0 0 0",
            "--dir", str(workdir), "--logfile", str(workdir / "redis-server.log"),
            "--loglevel", "warning",
        ])

    def direct(self, a: str, b: str) -> str:
        return f"dm:{a}:{b}" if a < b else f"dm:{b}:{a}"

    def group(self, name: str) -> str:
        return f"group:{name}"

    async def open(self, user: str, subscribe: tuple[str, ...] = (),
                   source: str | None = None) -> Opened:
        """A subscriber of ``subscribe``, or with none a publisher; quiet on return.

        One round trip, the least a client needs to know it was admitted:
        ``AUTH``, answered ``+OK`` (a subscriber's SUBSCRIBE follows it in
        the same write); redis-server sends nothing unasked afterwards, so
        ``settle`` has nothing to wait for.  Redis refuses a client over
        maxclients by writing an error and closing, which the reply tells.
        """
        reader, writer = await open_stream(self.host, self.port, source)
        channels = [c.encode() for c in dict.fromkeys(subscribe)]
        request, expected = self.auth, b"+OK\r\n"
        if channels:
            request += resp(b"SUBSCRIBE", *channels)
            expected += b"".join(subscribed(c, n) for n, c in enumerate(channels, 1))
        writer.write(request)
        try:
            reply = await asyncio.wait_for(reader.readexactly(len(expected)), SETUP_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            writer.close()
            raise ConnectionError(f"redis-server closed during setup after {e.partial!r}") from None
        except BaseException:
            writer.close()
            raise
        if reply != expected:
            writer.close()
            raise ConnectionError(f"redis-server answered {reply[:200]!r}, not {expected[:200]!r}")
        return Opened(reader, writer)

    def wire(self, channel: str, sender: str, payload: int, subscribers: int = 1) -> Wire:
        """``PUBLISH`` commands; deliveries are ``message`` pushes.

        The reply to each PUBLISH is the number of clients that received it,
        ``:<subscribers>\\r\\n``, so its size depends on the scenario.
        """
        name, body = channel.encode(), payload_body(payload)
        # The payload is the last bulk string of both.
        return crlf_wire(resp(b"PUBLISH", name, body), len(resp(b"message", name, body)),
                         reply_per_publish=len(b":%d\r\n" % subscribers))
