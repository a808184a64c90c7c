"""asyncio client of protocol v1, over the same compiled codec as the server.

Three ways to consume, as in asyncpg and nats.py::

    async with fenghuo.connect("tcp://127.0.0.1:7700", token=token) as client:
        ack = await client.send("bob", "hello")
        async for message in client.messages():
            ...

    client.on_message(callback)     # sync or async callbacks

The client reconnects with jittered exponential backoff and resumes: it sends
its last seq per channel, re-subscribes, and re-sends unacknowledged publishes
under their idempotency keys, so the application sees each message once, in
order, and each publish is sequenced once.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import random
import secrets
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from urllib.parse import urlsplit

import orjson

from fenghuo.channels import direct_channel
from fenghuo.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_PORT,
    FRAME_HEADER_SIZE,
    Ack,
    ContentType,
    ErrorCode,
    Frame,
    FrameFlag,
    FrameReader,
    FrameType,
    Message,
    ProtocolError,
    Receipt,
    ReceiptKind,
    decode_ack,
    decode_error,
    decode_json,
    decode_message,
    decode_receipt_event,
    encode_frame,
    encode_json,
    encode_publish,
    encode_receipt,
    try_again_delay,
)
from fenghuo.tokens import issue_token

log = logging.getLogger("fenghuo.client")

Callback = Callable[[Any], Any]
# Errors after which reconnecting cannot help.
# DEVICE_REPLACED: another connection of this device took over; reconnecting
# would take it back, and two clients would take turns for ever.
# TOKEN_EXPIRED is one of them only without a token provider to ask for a new token.
_TERMINAL = {ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_REVOKED,
             ErrorCode.HELLO_REQUIRED, ErrorCode.DEVICE_REPLACED}
# Refusals of a HELLO that a later attempt may not get; any other refusal of
# the same HELLO would repeat forever.
_HELLO_RETRYABLE = {ErrorCode.SHUTTING_DOWN, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED,
                    ErrorCode.TRY_AGAIN}
# A connection that drops sooner than this after WELCOME does not reset the backoff.
_STABLE_AFTER_S = 1.0
# How often this device's positions are stored on the relay (when they moved).
CURSOR_SYNC_S = 0.5
# What the inbox of messages()/next_message() holds before it drops new
# messages (SlowConsumer), as nats.py does per subscription (512 Ki messages
# and 128 MiB: nats/aio/subscription.py, DEFAULT_SUB_PENDING_*).  A choice,
# not a measurement: a reader that keeps up never nears 64 Ki messages, and
# 64 MiB caps what one that stopped reading costs the process.
DEFAULT_PENDING_MESSAGES = 64 * 1024
DEFAULT_PENDING_BYTES = 64 << 20

# Share of a token's remaining lifetime (from WELCOME or the last REFRESH) after
# which the client asks its token provider for a new one (docs/PROTOCOL.md §5.7).
REFRESH_AT = 0.8
# Wait before asking again after a failed refresh, at most (seconds).
REFRESH_RETRY_S = 30.0

TokenProvider = Callable[[], "str | Awaitable[str]"]


class FenghuoError(Exception):
    """An ERROR frame from the server: ``code`` is in docs/PROTOCOL.md."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ConnectionLost(FenghuoError):
    """The request could not complete: the connection dropped before its reply."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__(0, message)


class SlowConsumer(FenghuoError):
    """Given to ``on_error`` callbacks when the inbox is full and drops a message.

    Once per episode: the next one comes after the inbox had room again.
    ``channel`` and ``seq`` name the first message dropped.
    """

    def __init__(self, channel: str, seq: int, limit: str) -> None:
        super().__init__(0, f"slow consumer: inbox full ({limit}), dropping messages from "
                            f"{channel} #{seq} on (callbacks still get them)")
        self.channel = channel
        self.seq = seq


def _same_store(old: str, new: str | None) -> bool:
    """Epochs of a durable relay are ``<store id>.<boot id>``: the same data, restarted?"""
    return new is not None and "." in old and old.split(".")[0] == new.split(".")[0]


SCHEMES = ("tcp", "tls")


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A message the relay keeps to publish at ``send_at`` (SCHEDULE, PROTOCOL §3.17a)."""

    id: int
    channel: str
    send_at: float
    #: the key was scheduled before: ``id`` is that message's
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where a relay listens: ``scheme`` is ``tcp`` (plaintext) or ``tls``."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "tls"


def parse_server(server: str) -> ServerAddress:
    """``tcp://host:port``, ``tls://host:port``, ``host:port`` or ``host``.

    A bare address is plaintext; any scheme but ``tcp`` and ``tls`` is a
    :class:`ValueError`, never a silent plaintext connection (docs/PROTOCOL.md §1.1).
    """
    parts = urlsplit(server if "://" in server else f"tcp://{server}")
    if parts.scheme not in SCHEMES:
        raise ValueError(f"unsupported server URL {server!r}: the scheme must be tcp:// or tls://")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad server URL {server!r}: {exc}") from None
    return ServerAddress(parts.scheme, parts.hostname or "127.0.0.1", port)


def client_tls_context(ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> ssl.SSLContext:
    """Verification on (the system CAs, or only ``ca``), with an optional client certificate."""
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def new_key() -> bytes:
    """A new idempotency key: 24 hex characters, the wall clock's milliseconds
    (48 bits) then 48 random bits.

    The random half keeps keys unique across processes and restarts; the
    time half makes one sender's keys sort in the order they were made, so a
    durable relay files each in its key index next to the one before (a
    random key lands on a random page: about 3 times the store's work per
    message, bench/micro/test_store_keys.py).
    """
    return ((time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF).to_bytes(6, "big")
            + secrets.token_bytes(6)).hex().encode()


def _inflated_size(frame: bytes) -> int:
    """The size of ``frame`` with its body inflated: a compressed body begins with
    its uncompressed size (PROTOCOL §2.3)."""
    if not int.from_bytes(frame[6:8], "big") & FrameFlag.COMPRESSED:
        return len(frame)
    return FRAME_HEADER_SIZE + int.from_bytes(frame[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + 4], "big")


def encode_payload(data: str | bytes | dict[str, Any] | list[Any], content_type: int | None) -> tuple[bytes, int]:
    """A message's payload bytes and content type: a str is TEXT, JSON is CARD, bytes BINARY."""
    if isinstance(data, str):
        return data.encode(), ContentType.TEXT if content_type is None else content_type
    if isinstance(data, (dict, list)):
        return orjson.dumps(data), ContentType.CARD if content_type is None else content_type
    return bytes(data), ContentType.BINARY if content_type is None else content_type


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.reader = FrameReader(client.max_frame)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ProtocolError as exc:
            log.error("server sent a malformed stream: %s", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        for frame in frames:
            self.client._on_frame(self, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(self, exc)


class Client:
    """One logical session: survives reconnects until :meth:`close`.

    A request whose frame (inflated) is over the relay's ``max_frame`` (WELCOME's)
    is not sent: it raises :class:`FenghuoError` ``FRAME_TOO_LARGE`` and the
    connection stays up, where the relay would cut it (PROTOCOL §2.1).
    """

    def __init__(self, server: str = f"tcp://127.0.0.1:{DEFAULT_PORT}", *,
                 token: str | None = None, user: str | None = None, secret: str | None = None,
                 channels: tuple[str, ...] = (), device: str | None = None,
                 reconnect: bool = True, max_backoff: float = 5.0,
                 connect_timeout: float = 10.0, compress_threshold: int = 4096,
                 max_frame: int = DEFAULT_MAX_FRAME, sync_cursors: bool = True,
                 sync_from_start: bool = False,
                 pending_messages: int = DEFAULT_PENDING_MESSAGES,
                 pending_bytes: int = DEFAULT_PENDING_BYTES, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls: ssl.SSLContext | None = None,
                 token_provider: TokenProvider | None = None) -> None:
        """``pending_messages``/``pending_bytes`` bound the inbox that :meth:`messages`
        and :meth:`next_message` read (payload bytes); when either is reached a
        new message is not queued: :attr:`dropped` counts it, ``on_error``
        callbacks get a :class:`SlowConsumer` once per episode, and
        ``on_message`` callbacks and :attr:`positions` see it as usual.
        ``pending_messages=0``: no inbox at all, for clients that only use
        callbacks (``fenghuo chat``); :meth:`messages` then raises ValueError.

        ``tls_ca``/``tls_cert``/``tls_key`` (or a ready ``tls`` context) apply to a
        ``tls://`` server; ``token_provider`` (sync or async) is asked for a new
        token before the current one expires (REFRESH) and after TOKEN_EXPIRED.
        """
        if pending_messages < 0 or pending_bytes < 1:
            raise ValueError("pending_messages must be >= 0 and pending_bytes >= 1")
        self.address = parse_server(server)
        self.host, self.port = self.address.host, self.address.port
        #: the TLS context of a ``tls://`` server; None for ``tcp://``
        self.tls: ssl.SSLContext | None = None
        if self.address.tls:
            self.tls = tls or client_tls_context(tls_ca, tls_cert, tls_key)
        elif tls is not None or tls_ca or tls_cert:
            raise ValueError(f"TLS options need a tls:// server URL, not {server!r}")
        #: called (sync or async) for a new token before the current one expires,
        #: and to reconnect after TOKEN_EXPIRED; None: the token is used until it fails
        self.token_provider = token_provider
        self._token_stale = token is None and token_provider is not None
        if token is None and token_provider is None:
            if user is None or secret is None:
                raise ValueError("pass token=, token_provider=, or user= and secret= to mint one")
            token = issue_token(secret, user, channels=channels)
        self.token = token or ""
        self._refresher: asyncio.TimerHandle | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self.device = device or "py-" + secrets.token_hex(4)
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.compress_threshold = compress_threshold
        self.max_frame = max_frame
        self.sync_cursors = sync_cursors
        #: a new device that wants every stored message of its channels, not just live ones
        self.sync_from_start = sync_from_start
        self.user: str | None = None
        self.epoch: str | None = None
        self.welcome: dict[str, Any] = {}
        #: last seq seen per channel; sent on reconnect so the server resumes there
        self.positions: dict[str, int] = {}
        self._proto: _Protocol | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._terminal: FenghuoError | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._unacked: OrderedDict[int, bytes] = OrderedDict()
        self._subscriptions: set[str] = set()
        # Unbounded as a queue so the end mark always fits; bounded by _queue().
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self.pending_messages = pending_messages
        self.pending_bytes = pending_bytes
        self._inbox_bytes = 0
        self._slow = False              # in a slow-consumer episode: dropping
        #: messages the inbox dropped because it was full (callbacks got them)
        self.dropped = 0
        self._callbacks: dict[str, list[Callback]] = {}
        self._callback_tasks: set[asyncio.Future[Any]] = set()   # referenced until done
        self._reconnector: asyncio.Task[None] | None = None
        self._reconnect_after = 0.0
        # Seconds the server asked us to wait (TRY_AGAIN), jitter included;
        # None when the last attempt was not refused that way.
        self._told_to_wait: float | None = None
        self._connecting = False
        self._hello_id = 0
        self._watching: set[str] = set()
        self._cursor_changes: dict[str, int] = {}
        self._cursor_timer: asyncio.TimerHandle | None = None
        self._welcomed_at = 0.0
        self._flaps = 0

    # ------------------------------------------------------------ connection

    async def connect(self) -> Client:
        """Connect and authenticate.

        A server admitting a connection storm refuses with ``TRY_AGAIN`` and a
        wait; with ``reconnect`` on (the default) this waits as told, jitter
        included, and tries again until it is admitted.  Any other failure
        raises, and leaves no reconnect attempt running.
        """
        self._connecting = True
        try:
            while True:
                self._told_to_wait = None
                try:
                    await self._connect_once()
                    return self
                except FenghuoError:
                    wait = self._told_to_wait
                    if wait is None or not self.reconnect or self._closed:
                        raise
                log.info("server busy: trying again", extra={"wait_s": round(wait, 3)})
                await asyncio.sleep(wait)
        finally:
            self._connecting = False

    async def _connect_once(self) -> None:
        loop = asyncio.get_running_loop()
        if self._token_stale:
            self.token = await self._fetch_token()
            self._token_stale = False
        transport, proto = await asyncio.wait_for(self._open(lambda: _Protocol(self)),
                                                  self.connect_timeout)
        assert isinstance(proto, _Protocol)
        self._proto = proto
        self._hello_id = rid = self._request_id()
        welcome = loop.create_future()
        self._pending[rid] = welcome
        if self.epoch:
            positions: dict[str, int] | None = dict(self.positions)
        else:
            positions = {} if self.sync_from_start else None
        hello = {"token": self.token, "device": self.device, "client": "fenghuo-python/0.1",
                 "epoch": self.epoch, "positions": positions}
        transport.write(encode_json(FrameType.HELLO, hello, rid))
        try:
            await asyncio.wait_for(welcome, self.connect_timeout)
        except BaseException:
            transport.abort()
            raise
        if self._proto is not proto:
            # Lost after WELCOME arrived but before we got here: _on_lost has run
            # (and started no reconnector, this attempt being one); retry.
            raise ConnectionLost()
        # Resume: re-subscribe, then re-send what the server never acknowledged,
        # in order, under the same idempotency keys.
        for name in sorted(self._subscriptions):
            self._write(encode_json(FrameType.SUBSCRIBE, {
                "channel": name, "positions": self.positions}, self._request_id()))
        if self._watching:
            self._write(encode_json(FrameType.PRESENCE, {
                "op": "subscribe", "users": sorted(self._watching)}, self._request_id()))
        for frame in self._unacked.values():
            self._write(frame)
        self._welcomed_at = loop.time()
        self._connected.set()

    async def _open(self, protocol: Callable[[], asyncio.Protocol]
                    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        """A connection to the server: TCP, with TLS for a ``tls://`` URL.  (The
        server API's sessions are opened inside the relay instead, server/api.py.)"""
        return await asyncio.get_running_loop().create_connection(
            protocol, self.host, self.port, ssl=self.tls)

    def _on_welcome(self, body: dict[str, Any]) -> None:
        heads = body.get("channels") or {}
        if self.epoch is not None and body.get("epoch") != self.epoch:
            if body.get("durable") and _same_store(self.epoch, body.get("epoch")):
                # The server restarted over its store: positions stay valid,
                # except past a head (messages it never made durable).
                self._cap_at(heads)
            else:
                # It restarted without its state: old positions mean nothing now.
                self.positions.clear()
        elif self.epoch is None:
            if self.sync_from_start:
                pass    # every channel is replayed from its start: take it all
            elif body.get("resumed"):
                # The relay resumed this device from its stored cursors; the
                # channels it has none for are replayed: they are news.
                self.positions.update(body["resumed"])
            else:
                self._start_at(heads)
        self.epoch = body.get("epoch")
        self.user = body.get("user")
        self.welcome = body
        self._schedule_refresh(body.get("expires"))

    # ------------------------------------------------------------ token lifetime

    async def _fetch_token(self) -> str:
        assert self.token_provider is not None
        token = self.token_provider()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str):
            raise TypeError("the token provider must return a token (a string)")
        return token

    def _schedule_refresh(self, expires: Any, share: float = REFRESH_AT) -> None:
        """Ask for a new token when ``share`` of the time left before ``expires`` has passed."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self.token_provider is None or not isinstance(expires, (int, float)) or self._closed:
            return
        left = max(0.0, expires - time.time())
        self._refresher = asyncio.get_running_loop().call_later(
            left * share, self._start_refresh, expires)

    def _start_refresh(self, expires: float) -> None:
        self._refresher = None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_for(expires))

    async def _refresh_for(self, expires: float) -> None:
        try:
            result = await self.refresh()
        except Exception as exc:      # provider or server refused: try again before expiry
            log.warning("token refresh failed: %s", exc)
            left = expires - time.time()
            if left > 0 and not self._closed:
                self._refresher = asyncio.get_running_loop().call_later(
                    min(REFRESH_RETRY_S, left / 4), self._start_refresh, expires)
            return
        self._schedule_refresh(result.get("expires"))

    async def refresh(self, token: str | None = None) -> dict[str, Any]:
        """Replace this connection's token (REFRESH): ``token``, or one from the provider.

        Returns the server's RESULT (``{"user", "expires"}``); the new token is
        also the one used for later reconnects.
        """
        token = token if token is not None else await self._fetch_token()
        result = await self._request(FrameType.REFRESH, {"token": token})
        self.token = token
        return result

    def _on_lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        self._connected.clear()
        loop = asyncio.get_running_loop()
        lived = loop.time() - self._welcomed_at if self._welcomed_at else 0.0
        self._flaps = 0 if lived >= _STABLE_AFTER_S else self._flaps + 1
        for rid, fut in list(self._pending.items()):
            if rid not in self._unacked and not fut.done():
                fut.set_exception(ConnectionLost())
                del self._pending[rid]
        if self._closed or not self.reconnect or self._terminal is not None:
            # For good: later requests must fail at once instead of waiting forever.
            self._terminal = self._terminal or ConnectionLost("connection closed")
            self._fail_all(self._terminal)
            return
        if self._connecting:
            return      # connect() is still in charge: it retries or raises
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        attempt = self._flaps
        delay = self._reconnect_after
        self._reconnect_after = 0.0
        while not self._closed:
            # Full jitter (AWS architecture blog): spread a reconnect storm out.
            await asyncio.sleep(delay + random.uniform(0, min(self.max_backoff, 0.05 * 2 ** attempt)))
            self._told_to_wait = None
            try:
                await self._connect_once()
                log.info("reconnected", extra={"user": self.user, "attempt": attempt})
                return
            except FenghuoError:
                if self._terminal is not None:
                    self._fail_all(self._terminal)
                    return
            except (TimeoutError, OSError):
                pass
            if self._told_to_wait is not None:
                # Refused by admission, not failed: the server's wait replaces
                # the backoff, and the backoff does not grow.
                delay = self._told_to_wait
                continue
            attempt += 1
            delay = 0.0

    def _fail_all(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        self._unacked.clear()
        self._inbox.put_nowait(None)

    def _flush_cursors(self) -> None:
        self._cursor_timer = None
        if self._cursor_changes and self.connected:
            self._write(encode_json(FrameType.CURSOR, {"op": "sync",
                                                       "positions": self._cursor_changes}))
            self._cursor_changes = {}

    async def close(self) -> None:
        """Close for good: no reconnect; ``messages()`` ends."""
        if self._closed:
            return
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
        self._flush_cursors()
        self._closed = True
        self._connected.clear()
        if self._refresher is not None:
            self._refresher.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._reconnector is not None:
            self._reconnector.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._fail_all(ConnectionLost("client closed"))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stopped(self) -> bool:
        """Closed, or stopped for good by a terminal error (TOKEN_REVOKED,
        TOKEN_INVALID, DEVICE_REPLACED, ...): every request would raise."""
        return self._closed or self._terminal is not None

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # ------------------------------------------------------------ frames in

    def _on_frame(self, proto: _Protocol, frame: Frame) -> None:
        ftype = frame.type
        if ftype == FrameType.MESSAGE:
            self._on_message(decode_message(frame.body))
        elif ftype == FrameType.ACK:
            ack = decode_ack(frame.body)
            self._unacked.pop(frame.request_id, None)
            self._resolve(frame.request_id, ack)
        elif ftype == FrameType.HISTORY_PAGE:
            self._resolve(frame.request_id, frame.body)
        elif ftype in (FrameType.RESULT, FrameType.WELCOME):
            body = decode_json(frame.body)
            if ftype == FrameType.WELCOME:
                self._on_welcome(body)
            self._resolve(frame.request_id, body)
        elif ftype == FrameType.ERROR:
            self._on_error(frame)
        elif ftype == FrameType.RECEIPT_EVENT:
            self._emit("receipt", decode_receipt_event(frame.body))
        elif ftype == FrameType.PRESENCE_EVENT:
            self._emit("presence", decode_json(frame.body))
        elif ftype == FrameType.GAP:
            self._emit("gap", decode_json(frame.body))
        elif ftype == FrameType.PING:
            if proto.transport is not None:
                proto.transport.write(encode_frame(FrameType.PONG, frame.body, frame.request_id))
        elif ftype == FrameType.GOAWAY:
            self._reconnect_after = decode_json(frame.body).get("reconnect_after_ms", 0) / 1000

    def _on_message(self, message: Message) -> None:
        # Catch-up and live delivery may overlap after a reconnect: the seq decides.
        if message.seq <= self.positions.get(message.channel, 0):
            return
        self.positions[message.channel] = message.seq
        if self.sync_cursors:
            self._cursor_changes[message.channel] = message.seq
            if self._cursor_timer is None:
                self._cursor_timer = asyncio.get_running_loop().call_later(
                    CURSOR_SYNC_S, self._flush_cursors)
        if self.pending_messages:
            self._queue(message)
        self._emit("message", message)

    def _queue(self, message: Message) -> None:
        size = len(message.payload)
        full = ("messages" if self._inbox.qsize() >= self.pending_messages else
                "bytes" if self._inbox_bytes + size > self.pending_bytes else None)
        if full is None:
            self._slow = False
            self._inbox_bytes += size
            self._inbox.put_nowait(message)
            return
        self.dropped += 1
        if not self._slow:
            self._slow = True
            limit = (f"{self.pending_messages} messages" if full == "messages"
                     else f"{self.pending_bytes} bytes")
            error = SlowConsumer(message.channel, message.seq, limit)
            log.warning("%s", error)
            self._emit("error", error)

    async def _take(self, timeout: float | None = None) -> Message | None:
        if not self.pending_messages:
            raise ValueError("this client keeps no inbox (pending_messages=0): use on_message")
        message = await asyncio.wait_for(self._inbox.get(), timeout)
        if message is None:
            self._inbox.put_nowait(None)   # leave the end mark: later readers must end too
        else:
            self._inbox_bytes -= len(message.payload)
        return message

    def _on_error(self, frame: Frame) -> None:
        code, text = decode_error(frame.body)
        error = FenghuoError(code, text)
        if code == ErrorCode.TRY_AGAIN:
            # Refused by admission (a connection storm): the close follows;
            # the next attempt waits retry_after_ms plus jitter, never less.
            self._told_to_wait = try_again_delay(text)
        if frame.request_id and frame.request_id in self._pending:
            self._unacked.pop(frame.request_id, None)
            fut = self._pending.pop(frame.request_id)
            if not fut.done():
                fut.set_exception(error)
            if frame.request_id != self._hello_id:
                return
            if code not in _HELLO_RETRYABLE and not self._renewable(code):
                self._terminal = error
        if code in _TERMINAL and not self._renewable(code):
            self._terminal = error
        log.warning("server error %s: %s", code, text)
        self._emit("error", error)

    def _renewable(self, code: int) -> bool:
        """TOKEN_EXPIRED with a provider: reconnect with a new token (PROTOCOL §4)."""
        if code == ErrorCode.TOKEN_EXPIRED and self.token_provider is not None:
            self._token_stale = True
            return True
        return False

    def _resolve(self, request_id: int, value: Any) -> None:
        fut = self._pending.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _emit(self, kind: str, value: Any) -> None:
        for callback in self._callbacks.get(kind, ()):
            # An application bug must cost neither the other callbacks nor the
            # connection: an exception out of data_received aborts the transport.
            try:
                result = callback(value)
            except Exception:
                log.exception("%s callback failed", kind)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async callback failed", exc_info=task.exception())

    # ------------------------------------------------------------ frames out

    def _request_id(self) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return self._next_id

    def _write(self, frame: bytes) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.write(frame)

    def _check_usable(self) -> None:
        # Raise now: after close() or a terminal error nothing would ever answer.
        if self._terminal is not None:
            raise self._terminal
        if self._closed:
            raise ConnectionLost("client closed")

    async def _request(self, ftype: int, body: dict[str, Any]) -> dict[str, Any]:
        """The RESULT's decoded JSON (HISTORY, whose reply is frames, uses :meth:`_request_with`)."""
        result: dict[str, Any] = await self._request_with(lambda rid: encode_json(ftype, body, rid))
        return result

    async def _request_with(self, encode: Callable[[int], bytes]) -> Any:
        """Send the frame ``encode(request_id)`` makes; its reply: a RESULT's decoded
        JSON, a HISTORY_PAGE's frames as bytes."""
        self._check_usable()
        await self._connected.wait()
        rid = self._request_id()
        frame = encode(rid)
        self._check_fits(frame)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._write(frame)
        return await fut

    def _check_fits(self, frame: bytes) -> None:
        """Refuse ``frame`` here if it is over the relay's ``max_frame``.

        The relay cuts a connection for an oversized frame without a request id
        (PROTOCOL §2.1), so sending it would lose the session (and a PUBLISH
        resent on reconnect would loop forever).  A compressed frame counts at
        its inflated size, as the relay counts it (PROTOCOL §2.3).
        """
        size = _inflated_size(frame)
        limit = self.welcome.get("max_frame", self.max_frame)
        if size > limit:
            raise FenghuoError(ErrorCode.FRAME_TOO_LARGE,
                               f"{FrameType(frame[5]).name} of {size} bytes exceeds the "
                               f"{limit}-byte frame limit")

    # ------------------------------------------------------------ public API

    def on_message(self, callback: Callable[[Message], Any]) -> None:
        """Call ``callback(message)`` for each new message (sync or async)."""
        self._callbacks.setdefault("message", []).append(callback)

    def on_receipt(self, callback: Callable[[Receipt], Any]) -> None:
        """Call ``callback(receipt)`` when a recipient marks our message delivered or read."""
        self._callbacks.setdefault("receipt", []).append(callback)

    def on_presence(self, callback: Callable[[dict[str, Any]], Any]) -> None:
        self._callbacks.setdefault("presence", []).append(callback)

    def on_gap(self, callback: Callable[[dict[str, Any]], Any]) -> None:
        """Called when catch-up could not reach back far enough (messages were missed)."""
        self._callbacks.setdefault("gap", []).append(callback)

    def on_error(self, callback: Callable[[FenghuoError], Any]) -> None:
        self._callbacks.setdefault("error", []).append(callback)

    async def messages(self) -> AsyncIterator[Message]:
        """Every new message, in order per channel, until :meth:`close`.

        Messages wait in a bounded inbox (``pending_messages``,
        ``pending_bytes``): a reader that falls that far behind loses the
        newest ones (see :class:`SlowConsumer`); ``history()`` fetches them.
        """
        while (message := await self._take()) is not None:
            yield message

    async def next_message(self, timeout: float | None = None) -> Message:
        if (message := await self._take(timeout)) is None:
            raise ConnectionLost("client closed")
        return message

    async def publish(self, channel: str, data: str | bytes | dict[str, Any] | list[Any], *,
                      content_type: int | None = None, meta: dict[str, Any] | bytes | None = None,
                      key: str | bytes | None = None) -> Ack:
        """Publish to ``channel``; returns the server's ack with the assigned seq.

        ``key`` makes retries safe: the server sequences a key once and answers
        a repeat with the original seq.  One is generated when not given.
        """
        self._check_usable()
        payload, ctype = encode_payload(data, content_type)
        meta_bytes = orjson.dumps(meta) if isinstance(meta, dict) else (meta or b"")
        key_bytes = key.encode() if isinstance(key, str) else (key or new_key())
        rid = self._request_id()
        frame = encode_publish(channel, payload, ctype, meta_bytes, key_bytes, rid,
                               self.compress_threshold)
        self._check_fits(frame)
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._unacked[rid] = frame
        if self.connected:
            self._write(frame)
        return await fut

    async def send(self, to: str, data: str | bytes | dict[str, Any] | list[Any], **kwargs: Any) -> Ack:
        """Publish to the direct channel of this user and ``to``."""
        if self.user is None:
            self._check_usable()
            await self._connected.wait()
        return await self.publish(direct_channel(self.user, to), data, **kwargs)  # type: ignore[arg-type]

    async def subscribe(self, channel: str) -> dict[str, Any]:
        """Receive ``channel`` (and, for ``org.*``, what is published above it)."""
        result = await self._request(FrameType.SUBSCRIBE, {"channel": channel,
                                                           "positions": self.positions})
        if channel.startswith("org"):
            self._subscriptions.add(channel)
        self._cap_at(result.get("channels") or {})
        self._start_at(result.get("channels"))
        return result

    def _cap_at(self, heads: dict[str, int]) -> None:
        # A position past the server's head names messages the server lost
        # (fsync=batch|off crash): what it numbers next must not be skipped.
        for name, head in heads.items():
            if self.positions.get(name, 0) > head:
                self.positions[name] = head

    def _start_at(self, heads: dict[str, int] | None) -> None:
        # A channel's position starts at its head when we first receive it: what
        # came before is history, not news.  (A channel without a position is
        # replayed from the start at resume: right for one created while away.)
        for name, seq in (heads or {}).items():
            self.positions.setdefault(name, seq)

    async def unsubscribe(self, channel: str) -> dict[str, Any]:
        self._subscriptions.discard(channel)
        return await self._request(FrameType.UNSUBSCRIBE, {"channel": channel})

    async def schedule(self, channel: str, data: str | bytes | dict[str, Any] | list[Any],
                       send_at: float, *, content_type: int | None = None,
                       meta: dict[str, Any] | None = None, key: str | None = None) -> Scheduled:
        """Have the relay publish to ``channel`` at ``send_at`` (Unix seconds) as this user.

        Checked now as a publish is (FORBIDDEN, INVALID_CHANNEL, NOT_FOUND); ``key``
        makes a retry return the same scheduled message (one is generated when not given).
        """
        body: dict[str, Any] = {"op": "publish", "channel": channel, "send_at": send_at,
                                "key": key or new_key().decode()}
        if isinstance(data, bytes):
            body["data_b64"] = base64.b64encode(data).decode()
        else:
            body["data"] = data
        if content_type is not None:
            body["content_type"] = content_type
        if meta is not None:
            body["meta"] = meta
        result = await self._request(FrameType.SCHEDULE, body)
        return Scheduled(result["scheduled"], result["channel"], result["send_at"],
                         result["duplicate"])

    async def scheduled(self, *, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """This user's scheduled messages not yet sent, by id (those with an id above
        ``after``; at most ``limit``, default 100): each ``{"id", "send_at", "channel",
        "data" or "data_b64", ...}`` as PROTOCOL §3.17a lists them."""
        body: dict[str, Any] = {"op": "list", "after": after}
        if limit is not None:
            body["limit"] = limit
        result = await self._request(FrameType.SCHEDULE, body)
        listed: list[dict[str, Any]] = result["scheduled"]
        return listed

    async def cancel_scheduled(self, scheduled_id: int) -> None:
        """Cancel one of this user's scheduled messages; NOT_FOUND if it was sent, cancelled,
        never made or is another user's, CONFLICT if it is being sent."""
        await self._request(FrameType.SCHEDULE, {"op": "cancel", "id": scheduled_id})

    async def history(self, channel: str, *, before: int | None = None, after: int | None = None,
                      since_us: int | None = None, until_us: int | None = None,
                      limit: int = 100) -> list[Message]:
        """A page of ``channel``'s past messages, oldest first.

        ``after=s``: the first ``limit`` messages after seq ``s`` (paging forward);
        ``before=s`` (or nothing: the latest): the last ``limit`` before ``s``;
        ``since_us``/``until_us``: by server timestamp.  A page stops early at
        the frame size limit: ask again from its last seq.  History does not go
        through :meth:`messages` and does not move positions.
        """
        body = {"channel": channel, "limit": limit}
        for key, value in (("before", before), ("after", after), ("since_us", since_us),
                           ("until_us", until_us)):
            if value is not None:
                body[key] = value
        page: bytes = await self._request_with(lambda rid: encode_json(FrameType.HISTORY, body, rid))
        return [decode_message(frame.body) for frame in FrameReader(self.max_frame).feed(page)]

    async def sync_cursors_now(self) -> int:
        """Store this device's positions on the relay now (they are also synced
        every ``CURSOR_SYNC_S`` seconds and on close); returns how many were kept."""
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        changes, self._cursor_changes = self._cursor_changes, {}
        result = await self._request(FrameType.CURSOR, {"op": "sync", "positions": changes})
        saved: int = result["saved"]
        return saved

    async def unread(self) -> dict[str, int]:
        """Unread messages per channel: the same on every device of this user."""
        unread: dict[str, int] = (await self._request(FrameType.CURSOR, {"op": "unread"}))["unread"]
        return unread

    async def readers(self, channel: str, seq: int) -> dict[str, Any]:
        """``{"read": x, "members": n}``: how many have read message ``seq`` of ``channel``."""
        return await self._request(FrameType.CURSOR, {"op": "readers", "channel": channel,
                                                      "seq": seq})

    async def mark_delivered(self, channel: str, seq: int, *, confirm: bool = False) -> dict[str, Any] | None:
        """Tell the relay (and the sender) message ``seq`` of ``channel`` arrived; see :meth:`mark_read`."""
        return await self._receipt(channel, seq, ReceiptKind.DELIVERED, confirm)

    async def mark_read(self, channel: str, seq: int, *, confirm: bool = False) -> dict[str, Any] | None:
        """Mark message ``seq`` of ``channel`` (and all before it) read.

        By default the receipt is sent and not answered (PROTOCOL §3.11, request
        id 0); with ``confirm`` it carries a request id and this returns the
        relay's RESULT, or raises (``NOT_FOUND`` for a message it no longer holds).
        """
        return await self._receipt(channel, seq, ReceiptKind.READ, confirm)

    async def click(self, channel: str, seq: int, link: str) -> dict[str, Any]:
        """Report that this user followed link ``link`` (an id of 1-64 bytes the app
        gave it) of message ``seq``; ``{"first": bool, ...}`` (PROTOCOL §3.11)."""
        result: dict[str, Any] = await self._request_with(
            lambda rid: encode_receipt(channel, seq, ReceiptKind.CLICKED, rid, link))
        return result

    async def _receipt(self, channel: str, seq: int, kind: int, confirm: bool) -> dict[str, Any] | None:
        if confirm:
            result: dict[str, Any] = await self._request_with(
                lambda rid: encode_receipt(channel, seq, kind, rid))
            return result
        self._check_usable()
        await self._connected.wait()
        self._write(encode_receipt(channel, seq, kind))
        return None

    async def presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        result = await self._request(FrameType.PRESENCE, {"op": "query", "users": users})
        presence: dict[str, dict[str, Any]] = result["users"]
        return presence

    async def watch_presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        """Current presence of ``users``; changes arrive at :meth:`on_presence` callbacks.

        The watch survives reconnects until :meth:`unwatch_presence`.
        """
        result = await self._request(FrameType.PRESENCE, {"op": "subscribe", "users": users})
        self._watching.update(users)
        presence: dict[str, dict[str, Any]] = result["users"]
        return presence

    async def unwatch_presence(self, users: list[str]) -> dict[str, dict[str, Any]]:
        self._watching.difference_update(users)
        result = await self._request(FrameType.PRESENCE, {"op": "unsubscribe", "users": users})
        presence: dict[str, dict[str, Any]] = result["users"]
        return presence

    async def create_group(self, group: str, members: Sequence[str] = (), title: str = "") -> dict[str, Any]:
        return await self._request(FrameType.GROUP, {"op": "create", "group": group,
                                                     "members": list(members), "title": title})

    async def add_members(self, group: str, users: list[str], role: str = "member") -> dict[str, Any]:
        return await self._request(FrameType.GROUP, {"op": "add", "group": group,
                                                     "users": users, "role": role})

    async def remove_members(self, group: str, users: list[str]) -> dict[str, Any]:
        return await self._request(FrameType.GROUP, {"op": "remove", "group": group, "users": users})

    async def leave_group(self, group: str) -> dict[str, Any]:
        return await self._request(FrameType.GROUP, {"op": "leave", "group": group})

    async def set_role(self, group: str, user: str, role: str) -> dict[str, Any]:
        return await self._request(FrameType.GROUP, {"op": "role", "group": group,
                                                     "user": user, "role": role})

    async def handoff(self, group: str, to: str, *, remove: list[str] | None = None,
                      silence: list[str] | None = None, note: str = "") -> dict[str, Any]:
        """Hand the conversation ``group`` over to ``to`` (an owner's, admin's or service
        user's request): ``to`` joins, ``silence`` (the bot) become readers, a ``handoff``
        event is posted, ``remove`` leave."""
        return await self._request(FrameType.GROUP, {"op": "handoff", "group": group, "to": to,
                                                     "remove": remove or [],
                                                     "silence": silence or [], "note": note})

    async def queue_for_advisor(self, group: str, *, remove: list[str] | None = None,
                                silence: list[str] | None = None, note: str = "") -> dict[str, Any]:
        """Put conversation ``group`` in the queue for an advisor; the advisor who takes it
        gets it handed off with ``remove`` and ``silence`` (PROTOCOL §3.16a)."""
        return await self._request(FrameType.GROUP, {"op": "queue", "group": group,
                                                     "remove": remove or [],
                                                     "silence": silence or [], "note": note})

    async def take_conversation(self, group: str | None = None, *, attempts: int = 5) -> dict[str, Any]:
        """Take a waiting conversation (the longest waiting without ``group``) as an advisor:
        it is handed off to us.  Without ``group`` a CONFLICT (another advisor took the
        one we were given) is tried again, up to ``attempts`` times, after a pause that
        grows (50 ms, 100 ms, ...: the worker that offered it learns it was taken)."""
        for attempt in range(attempts):
            try:
                return await self._request(FrameType.GROUP, {"op": "take", "group": group})
            except FenghuoError as exc:
                if group is not None or exc.code != ErrorCode.CONFLICT or attempt == attempts - 1:
                    raise
            await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def list_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = (await self._request(FrameType.GROUP, {"op": "list"}))["groups"]
        return groups

    async def group_members(self, group: str) -> dict[str, str]:
        result = await self._request(FrameType.GROUP, {"op": "members", "group": group})
        members: dict[str, str] = result["members"]
        return members


class _Connector:
    """What :func:`connect` returns: ``await`` it or use it with ``async with``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client.connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._client.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()


def connect(server: str = f"tcp://127.0.0.1:{DEFAULT_PORT}", **kwargs: Any) -> _Connector:
    """Connect and authenticate; see :class:`Client` for the options."""
    return _Connector(Client(server, **kwargs))
