"""Protocol v1 over a blocking socket, for Locust users running under gevent.

The asyncio client (:mod:`fenghuo.client`) cannot run inside Locust's gevent
workers, so this module speaks the wire protocol directly: frames are encoded
and decoded by the compiled codec (:mod:`fenghuo.core`) and the JSON helpers of
:mod:`fenghuo.protocol`, which are pure functions and do not care which event
loop calls them.  A background greenlet reads the socket and hands every frame
to its owner: replies resolve the request that waits for them (matched by
request id), everything the relay sends on its own (MESSAGE, RECEIPT_EVENT,
connection-level ERROR) goes to callbacks.

Deliberately small: no reconnect, no resume, no unacked-publish buffer.  A load
test reports a lost connection as a failure and connects again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
from fenghuo.core import (
    Ack,
    ErrorCode,
    Frame,
    FrameReader,
    FrameType,
    Message,
    ProtocolError,
    Receipt,
    decode_ack,
    decode_error,
    decode_message,
    decode_receipt_event,
    encode_frame,
    encode_publish,
    encode_receipt,
)
from gevent import socket

from fenghuo.client import ConnectionLost, FenghuoError
from fenghuo.protocol import DEFAULT_MAX_FRAME, decode_json, encode_json

REQUEST_TIMEOUT = 10.0
"""Seconds a request waits for its reply before it counts as failed."""

_RECV_SIZE = 64 * 1024


def relay_error(code: int, text: str) -> FenghuoError:
    """An ERROR frame as an exception whose text names the documented code."""
    try:
        name = ErrorCode(code).name
    except ValueError:
        name = "UNKNOWN_ERROR"
    return FenghuoError(code, f"{name}: {text}")


class WireClient:
    """One authenticated connection to a relay, driven from gevent greenlets.

    ``on_message`` gets every MESSAGE, ``on_receipt`` every RECEIPT_EVENT,
    ``on_lost`` the reason when the connection ends without :meth:`close`
    (a connection-level ERROR such as ``SLOW_CONSUMER``, or the socket
    closing).  Callbacks run in the reader greenlet: they must not wait for a
    reply on this same connection.
    """

    def __init__(self, host: str, port: int, token: str, *,
                 on_message: Callable[[Message], None],
                 on_receipt: Callable[[Receipt], None],
                 on_lost: Callable[[Exception], None],
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.host, self.port, self.token = host, port, token
        self.on_message, self.on_receipt, self.on_lost = on_message, on_receipt, on_lost
        self.timeout = timeout
        self.welcome: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._send_lock = gevent.lock.Semaphore()
        self._pending: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        self._reader: gevent.Greenlet | None = None
        self._closing = False
        self._welcomed = False
        self._lost_reason: Exception | None = None

    # ------------------------------------------------------------ lifecycle

    def connect(self) -> dict[str, Any]:
        """TCP connect, HELLO, wait for WELCOME; its body is returned (and kept).

        Raises :class:`FenghuoError` for a refused HELLO (``TOKEN_INVALID``...),
        :class:`TimeoutError` or :class:`OSError`.
        """
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = gevent.spawn(self._read_forever, self._sock)
        hello = {"token": self.token, "client": "fenghuo-loadtest"}
        try:
            self.welcome = self.request(FrameType.HELLO, hello)
        except BaseException:
            self.close()
            raise
        self._welcomed = True
        return self.welcome

    def close(self) -> None:
        """Close the socket; the reader stops and ``on_lost`` is not called."""
        self._closing = True
        if self._sock is not None:
            self._sock.close()
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)
        self._fail_pending(ConnectionLost("connection closed by the load test"))

    @property
    def alive(self) -> bool:
        """Connected and not lost or closed."""
        return self._sock is not None and not self._closing and self._lost_reason is None

    # ------------------------------------------------------------ requests

    def publish(self, channel: str, payload: bytes, content_type: int) -> Ack:
        """PUBLISH and wait for its ACK."""
        return decode_ack(self._call(FrameType.PUBLISH, lambda rid: encode_publish(
            channel, payload, content_type, request_id=rid)))

    def request(self, ftype: int, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON control request (GROUP, SUBSCRIBE, CURSOR...) and its RESULT body."""
        return decode_json(self._call(ftype, lambda rid: encode_json(ftype, body, rid)))

    def receipt(self, channel: str, seq: int, kind: int) -> dict[str, Any]:
        """RECEIPT with a request id, so the RESULT (or ERROR) comes back."""
        return decode_json(self._call(FrameType.RECEIPT, lambda rid: encode_receipt(
            channel, seq, kind, rid)))

    def history(self, query: dict[str, Any]) -> tuple[list[Message], int]:
        """A HISTORY page: its messages, oldest first, and its size in bytes."""
        page = self._call(FrameType.HISTORY, lambda rid: encode_json(
            FrameType.HISTORY, query, rid))
        frames = FrameReader(DEFAULT_MAX_FRAME).feed(page)
        return [decode_message(frame.body) for frame in frames], len(page)

    def _call(self, ftype: int, frame_for: Callable[[int], bytes]) -> bytes:
        """Send the frame ``frame_for(request_id)`` and wait for the reply with that id."""
        if not self.alive:
            raise self._lost_reason or ConnectionLost("not connected")
        rid = next(self._ids)
        reply = gevent.event.AsyncResult()
        self._pending[rid] = reply
        try:
            self._send(frame_for(rid))
            return reply.get(timeout=self.timeout)
        except gevent.Timeout:
            raise TimeoutError(f"no reply to {FrameType(ftype).name} within "
                               f"{self.timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)

    def _send(self, frame: bytes) -> None:
        assert self._sock is not None
        # Two greenlets (a task and the reader's PONG) may write at once; a
        # gevent socket refuses concurrent writers rather than interleaving.
        with self._send_lock:
            self._sock.sendall(frame)

    # ------------------------------------------------------------ reading

    def _read_forever(self, sock: socket.socket) -> None:
        reader = FrameReader(DEFAULT_MAX_FRAME)
        try:
            while True:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionLost("connection closed by the relay")
                for frame in reader.feed(data):
                    self._dispatch(frame)
        except (OSError, ProtocolError, FenghuoError) as exc:
            self._lose(exc)
        except Exception as exc:  # a callback's bug: report it rather than go deaf silently
            self._lose(exc)
            raise

    def _dispatch(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype == FrameType.MESSAGE:
            self.on_message(decode_message(frame.body))
        elif ftype == FrameType.RECEIPT_EVENT:
            self.on_receipt(decode_receipt_event(frame.body))
        elif ftype == FrameType.ERROR:
            self._on_error(frame)
        elif ftype == FrameType.PING:
            self._send(encode_frame(FrameType.PONG, frame.body[:64], frame.request_id))
        elif ftype == FrameType.GOAWAY:
            raise ConnectionLost(f"relay sent GOAWAY {decode_json(frame.body)}")
        elif ftype in (FrameType.WELCOME, FrameType.RESULT, FrameType.ACK,
                       FrameType.HISTORY_PAGE):
            self._resolve(frame.request_id, frame.body)
        # PONG, PRESENCE_EVENT, GAP and unknown types are of no interest here.

    def _on_error(self, frame: Frame) -> None:
        code, text = decode_error(frame.body)
        error = relay_error(code, text)
        reply = self._pending.get(frame.request_id) if frame.request_id else None
        if reply is None:
            # Connection-level (request id 0): the relay closes right after it.
            raise error
        reply.set_exception(error)

    def _resolve(self, request_id: int, body: bytes) -> None:
        reply = self._pending.get(request_id)
        if reply is not None:
            reply.set(body)

    def _lose(self, reason: Exception) -> None:
        if self._closing or self._lost_reason is not None:
            return
        self._lost_reason = reason if isinstance(reason, FenghuoError) else ConnectionLost(
            f"connection lost: {reason!r}")
        self._fail_pending(self._lost_reason)
        if self._sock is not None:
            self._sock.close()
        if self._welcomed:   # a refused HELLO is the failure of connect() itself
            self.on_lost(self._lost_reason)

    def _fail_pending(self, reason: Exception) -> None:
        for reply in list(self._pending.values()):
            if not reply.ready():
                reply.set_exception(reason)
