"""A picows WebSocket client connection with the face of an asyncio stream.

The bench's handshake code reads and writes an ``asyncio.StreamReader`` /
``StreamWriter`` pair, and the compiled generator takes a connection over
through ``writer.transport.set_protocol`` and then only calls ``write``,
``close`` and its protocol's ``data_received``.  :func:`open_ws_stream`
gives that pair over one WebSocket, so every scenario runs unchanged over
the gateway (``python -m bench ws``): the binary messages' payloads are the
protocol's byte stream (docs/PROTOCOL.md §1.1a), handed on as they come.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect


class WsStream(WSListener):  # type: ignore[misc]
    """Listener, writer and transport of one WebSocket connection.

    Until a protocol is set, payloads go to ``reader`` (the handshake's
    requests); from then on straight to the protocol's ``data_received``.
    """

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()
        self.ws: WSTransport | None = None
        self.protocol: Any = None

    # -- WSListener
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            # Answered (RFC 6455 §5.5.1): the relay reads until the client's
            # close, or 5 s (PROTOCOL §1.1a, "Closing").
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.BINARY:
            return
        data = frame.get_payload_as_bytes()
        if self.protocol is not None:
            self.protocol.data_received(data)
        else:
            self.reader.feed_data(data)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.protocol is not None:
            self.protocol.connection_lost(None)
        else:
            self.reader.feed_eof()

    # -- StreamWriter face (the writer is its own transport)
    @property
    def transport(self) -> WsStream:
        return self

    def write(self, data: bytes) -> None:
        assert self.ws is not None
        self.ws.send(WSMsgType.BINARY, data)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.disconnect()

    # -- transport face, for the generator
    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


async def open_ws_stream(url: str, tls: ssl.SSLContext | None = None
                         ) -> tuple[asyncio.StreamReader, WsStream]:
    """``(reader, writer)`` over a WebSocket to ``url`` (``ws://`` or ``wss://``)."""
    _, stream = await ws_connect(WsStream, url, ssl_context=tls)
    if stream is None:      # picows: closed before the upgrade
        raise ConnectionError(f"{url} closed before the WebSocket upgrade")
    assert isinstance(stream, WsStream)     # the factory's
    return stream.reader, stream
