"""The WebSocket gateway: protocol v1 frames in binary WebSocket messages.

A WebSocket connection is one more way to reach a :class:`Session`: the
gateway hands the payload of every binary message to the session exactly as
TCP hands it the bytes it read (``get_buffer`` / ``buffer_updated``), and the
session writes to a :class:`WsTransport`, which sends each write as one binary
message.  Sessions, limits, errors, the idle timeout and GOAWAY are therefore
the TCP ones, from the same code.  WebSocket framing, masking and the HTTP
upgrade are picows' (Cython; docs/DESIGN.md, "WebSocket gateway").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSProtocolError,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fenghuo.core import LINGER_S, ErrorCode

if TYPE_CHECKING:
    from fenghuo.server.admission import Admission
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.gateway")
#: the ERROR text and close reason for a text message (PROTOCOL §1.1a)
TEXT_REFUSED = "text message: frames travel in binary messages only"
#: the close reasons (code 1002) for a fragment out of sequence (PROTOCOL §1.1a),
#: by whether a fragmented message was unfinished
FRAGMENT_REFUSED = {
    False: "Received a continuation frame with no message to continue, RFC 6455 section 5.4",
    True: "Received a new data frame inside an unfinished fragmented message, "
          "RFC 6455 section 5.4",
}
#: the close reason (code 1002) for a frame with an RSV bit set (PROTOCOL §1.1a)
RSV_REFUSED = ("Received frame with a reserved bit (RSV1, RSV2 or RSV3) set, "
               "no extension is negotiated, RFC 6455 section 5.2")
# picows' lines for the close it sends after a peer's bad frame (1002, 1009;
# RSV_REFUSED is raised as its WSProtocolError): a client's fault, logged by
# SessionListener at INFO with the peer, not by picows at ERROR without it.
_PEER_FAULTS = ("WS parser error:", "on_ws_frame raised WSProtocolError:")
# The read buffer each WebSocket starts with (picows does not go below 2048).
WS_READ_BUFFER = 2048
DEMO_DIR = Path(__file__).resolve().parent.parent / "clients"
# What the demo page may load: its page, its script and the client module.
DEMO_FILES = {
    "/": ("demo/index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo/demo.js", "text/javascript; charset=utf-8"),
    "/fenghuo.js": ("js/fenghuo.js", "text/javascript; charset=utf-8"),
}


class WsTransport(asyncio.Transport):
    """The asyncio-transport face a Session writes to, over one WebSocket."""

    __slots__ = ("ws", "tcp", "peer", "close_code", "close_reason", "failed")

    def __init__(self, ws: WSTransport) -> None:
        super().__init__()
        self.ws = ws
        self.tcp: asyncio.Transport = ws.underlying_transport
        address = self.tcp.get_extra_info("peername")
        #: ``host:port`` of the client, for the log
        self.peer = f"{address[0]}:{address[1]}" if address else None
        #: what the close frame says (1000; 1003 after a text message, 1013
        #: after TRY_AGAIN: close_after_error)
        self.close_code = WSCloseCode.OK
        self.close_reason = b""
        #: a fatal error has chosen the close frame: the first one says why
        self.failed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.ws.send(WSMsgType.BINARY, data)

    def writelines(self, frames: Iterable[bytes | bytearray | memoryview]) -> None:
        # One message for what one loop iteration queued: one WebSocket header
        # and one write instead of one per frame.
        self.ws.send(WSMsgType.BINARY, b"".join(frames))

    def close(self) -> None:
        self.write_eof()
        self.ws.disconnect(graceful=True)

    def abort(self) -> None:
        self.ws.disconnect(graceful=False)

    def pause_reading(self) -> None:
        self.tcp.pause_reading()

    def resume_reading(self) -> None:
        self.tcp.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self.tcp.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.tcp.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.tcp.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        # WebSocket's half-close is its close frame (RFC 6455 §5.5.1: the
        # sender of a close sends nothing after it, but still reads until the
        # peer's close).  Closing the socket at once, with what the client
        # still sends unread, made the kernel reset it: a browser whose large
        # message a fatal ERROR cut saw 1006 instead of 1000, and sometimes
        # lost the ERROR too (tests/test_browser_client.py).
        return True

    def close_after_error(self, code: int, close_code: WSCloseCode | None = None,
                          reason: bytes = b"") -> None:
        """The close frame that follows the fatal ERROR ``code`` says what it says:
        ``close_code`` and ``reason`` when given (a text message: 1003), else
        1013 (try again later) after TRY_AGAIN (a HELLO above the admission
        rate), as a refusal at the upgrade closes (:class:`RefusalListener`);
        1000 after the others (PROTOCOL §1.1a).  The first fatal error is the
        one the client is told of (the core sends no second ERROR): later calls
        change nothing."""
        if self.failed:
            return
        self.failed = True
        if close_code is not None:
            self.close_code, self.close_reason = close_code, reason
        elif code == ErrorCode.TRY_AGAIN:
            self.close_code = WSCloseCode.TRY_AGAIN_LATER

    def write_eof(self) -> None:
        # The session reads and discards until the client's close frame
        # arrives (SessionListener disconnects then) or its linger ends (close).
        if not self.ws.is_close_frame_sent:
            self.ws.send_close(self.close_code, self.close_reason)


class SessionListener(WSListener):
    """Feeds one WebSocket's binary messages to its Session, as one byte stream."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: WsTransport | None = None
        # Inside a fragmented message: its first frame came, its last not yet.
        self.fragmented = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = WsTransport(transport)
        self.session.connection_made(self.transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if transport.is_close_frame_sent:
            # After the server's close frame only the client's close matters:
            # the rest of what picows read with a failed frame is dropped
            # unprocessed, and no second close frame is sent (RFC 6455 §5.5.1).
            if kind == WSMsgType.CLOSE:
                transport.disconnect(graceful=True)
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # No extension gives them a meaning: RFC 6455 §5.2 fails the
            # connection.  picows sends the close (1002, this reason) and
            # disconnects 10 ms later, as after its own parser's errors.
            raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, RSV_REFUSED)
        if kind == WSMsgType.CONTINUATION or kind == WSMsgType.BINARY or kind == WSMsgType.TEXT:
            # picows passes fragments as they come without checking their
            # order: RFC 6455 §5.4 fails the connection as for the RSV bits.
            if (kind == WSMsgType.CONTINUATION) != self.fragmented:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, FRAGMENT_REFUSED[self.fragmented])
            self.fragmented = not frame.fin
        if kind == WSMsgType.BINARY or kind == WSMsgType.CONTINUATION:
            self.session.feed(frame.get_payload_as_memoryview())
        elif kind == WSMsgType.PING:
            # Answered here, not by picows' auto pong, which answers before the
            # RSV check above.
            transport.send_pong(frame.get_payload_as_bytes())
        elif kind == WSMsgType.CLOSE:
            # The client's code echoed; a close without one (a browser's
            # close() with no argument) is answered 1000: picows reads its
            # absent code as 0 and would send that, a code no client
            # accepts (RFC 6455 §7.4).  PROTOCOL §1.1a, "Closing".
            code = frame.get_close_code() if frame.payload_size >= 2 else WSCloseCode.OK
            transport.send_close(code)
            transport.disconnect(graceful=True)
        elif kind == WSMsgType.TEXT and self.transport is not None and not self.session.closing:
            # Frames are binary; a text message is a client speaking another
            # protocol: a framing error (MALFORMED_FRAME, fatal), said in an
            # ERROR the client can still read (a browser's onmessage), then
            # close 1003 with the same text, as after any fatal error: what
            # is owed first, then the close frame, then the linger (a
            # disconnect at once reset a browser still sending its message:
            # 1006 instead of 1003, 5 times in 6).  PROTOCOL §1.1a.
            self.transport.close_after_error(ErrorCode.MALFORMED_FRAME,
                                             WSCloseCode.UNSUPPORTED_DATA, TEXT_REFUSED.encode())
            self.session.close_with_error(ErrorCode.MALFORMED_FRAME, TEXT_REFUSED)
        # PONG needs nothing.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        if sent is not None and sent.code in (WSCloseCode.PROTOCOL_ERROR,
                                              WSCloseCode.MESSAGE_TOO_BIG):
            # A client's bad frame, not a server fault (picows' own lines for it
            # are demoted: PeerFaultLog).
            peer = self.transport.peer if self.transport is not None else None
            log.info("WebSocket frame refused", extra={
                "peer": peer, "code": sent.code.value, "reason": sent.reason})
        self.session.connection_lost(None)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class PeerFaultLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger: its ERROR lines for the close it sends after a client's
    bad frame (1002, 1009) come down to DEBUG; SessionListener logs each such
    close at INFO with the peer, which picows' line lacks.  Its other lines
    pass as they are."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and isinstance(msg, str) and msg.startswith(_PEER_FAULTS):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


class RefusalListener(WSListener):
    """Says TRY_AGAIN (the frame a refused TCP connection gets) and closes, as TCP does:
    the close frame is the half-close, then what the client sends is read and
    dropped until its close frame, or the admission sweep aborts the connection.

    Closing the socket right after the close frame, with the client's HELLO
    (sent at once after the upgrade) unread, made the kernel reset it, and a
    reset can destroy the ERROR and the 1013 before the client reads them
    (tests/test_websocket.py)."""

    def __init__(self, frame: bytes, admission: Admission) -> None:
        self.frame = frame
        self.admission = admission

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.BINARY, self.frame)
        transport.send_close(WSCloseCode.TRY_AGAIN_LATER)
        self.admission.linger(transport.underlying_transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect(graceful=True)


# The only WebSocket version (RFC 6455 §4.1, Sec-WebSocket-Version) the gateway speaks.
WS_VERSION = "13"


def _origin_allowed(request: WSUpgradeRequest, origins: frozenset[str]) -> bool:
    # No list: any origin.  A request without Origin is not from a browser
    # page (browsers always send it on a WebSocket upgrade): no page to refuse.
    origin = request.headers.get("Origin")
    return not origins or origin is None or origin in origins


def _demo_page(path: str) -> WSUpgradeResponse | None:
    entry = DEMO_FILES.get(path.split("?", 1)[0])
    if entry is None:
        return None
    name, content_type = entry
    try:
        body = (DEMO_DIR / name).read_bytes()
    except OSError:
        return None
    response: WSUpgradeResponse = WSUpgradeResponse.create_ok_response(
        body, {"Content-Type": content_type, "Cache-Control": "no-store"})
    return response


def listener_factory(relay: Relay, make_session: Callable[[], Session]
                     ) -> Callable[[WSUpgradeRequest], Any]:
    settings = relay.settings
    origins = frozenset(o.strip() for o in settings.ws_origins.split(",") if o.strip())

    def factory(request: WSUpgradeRequest) -> Any:
        path = request.path.decode("latin-1") if isinstance(request.path, bytes) else request.path
        upgrade = (request.headers.get("Upgrade") or "").lower() == "websocket"
        if not upgrade:
            page = _demo_page(path) if settings.ws_demo else None
            if page is None:
                page = WSUpgradeResponse.create_error_response(HTTPStatus.NOT_FOUND, b"not found\n")
            return WSUpgradeResponseWithListener(page, None)
        if request.headers.get("Sec-WebSocket-Version") != WS_VERSION:
            # RFC 6455 §4.2.2: another version (or none) is answered 426 naming
            # the one understood; picows would upgrade the drafts' 7 and 8 and
            # answer any other 400 without saying which version to use.
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                HTTPStatus.UPGRADE_REQUIRED, b"WebSocket version 13 only\n",
                extra_headers={"Sec-WebSocket-Version": WS_VERSION}), None)
        if not _origin_allowed(request, origins):
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(
                HTTPStatus.FORBIDDEN, b"origin not allowed\n"), None)
        refusal = relay.admission.refusal_frame()
        if refusal is not None:
            return RefusalListener(refusal, relay.admission)
        return SessionListener(make_session())
    return factory


async def start(relay: Relay, make_session: Callable[[], Session], *,
                reuse_port: bool) -> asyncio.Server:
    """Listen for WebSocket clients on ``--ws-port``: ``wss://`` when the relay has TLS.

    The TLS context is the client port's (:class:`ServerTLS`): the same
    certificate, the same client-certificate check, and a SIGHUP reload of it
    applies to both ports at once.
    """
    settings = relay.settings
    tls = relay.tls
    # picows logs every accept and disconnect at INFO: the session logs its own.
    logging.getLogger("picows").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    return await ws_create_server(
        listener_factory(relay, make_session), settings.host, settings.ws_port,
        # A WebSocket frame may carry several protocol frames, but never more
        # bytes than the largest protocol frame accepted.
        max_frame_size=settings.max_frame,
        # picows' smallest read buffer; it doubles for a larger message.  Its
        # default, 16 KiB per connection, was most of a WebSocket connection's
        # memory (python -m bench ws, connections: figures in bench/README).
        read_buffer_init_size=WS_READ_BUFFER,
        websocket_handshake_timeout=settings.handshake_timeout,
        # Liveness is the protocol's own PING and idle timeout, as on TCP.
        enable_auto_ping=False,
        # PING is answered by SessionListener, after its RSV check.
        enable_auto_pong=False,
        logger_name=PeerFaultLog(logging.getLogger("picows.fenghuo.gateway.ws")),
        backlog=settings.backlog, reuse_address=True, reuse_port=reuse_port,
        ssl=tls.context if tls is not None else None,
        ssl_handshake_timeout=settings.handshake_timeout if tls is not None else None,
        # The TLS close lingers as long as the client port's (server/node.py).
        ssl_shutdown_timeout=LINGER_S if tls is not None else None,
        # TLS is uvloop's, as on the client port: aiofastnet 1.2's (picows'
        # default when installed) reports a peer closing mid-handshake with an
        # exception class instead of an instance, which logs a broken error
        # line for every plaintext client on the port (tests/test_wss.py).
        use_aiofastnet=False if tls is not None else None,
    )
