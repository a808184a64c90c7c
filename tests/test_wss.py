"""``wss://``: TLS on the WebSocket port with the client port's options (docs/PROTOCOL.md §1.1a).

Real relays started with ``--tls-cert``/``--tls-key`` and ``--ws-port``, real
TLS handshakes against certificates from a CA made in the test
(tests/certs.py): picows and the JavaScript client (node) as clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import time
from typing import Any

import pytest
from picows import WSMsgType

from fenghuo.core import FrameType
from fenghuo.protocol import encode_publish
from tests.certs import CA
from tests.clients import collect
from test_js_client import JS, NODE, NODE_FLAGS, node_version
from test_websocket import hello, start_ws_relay, ws_open

TIMEOUT = 10.0


@pytest.fixture
def pki(tmp_path):
    ca = CA.create(tmp_path / "pki")
    cert, key = ca.issue("server")
    return ca, cert, key


def wss_relay(relay_factory: Any, cert: Any, key: Any, *flags: str, **kwargs: Any) -> Any:
    relay = start_ws_relay(relay_factory, "--tls-cert", str(cert), "--tls-key", str(key),
                           *flags, **kwargs)
    relay.wss_url = relay.ws_url.replace("ws://", "wss://")
    relay.ws_port = int(relay.ws_url.rsplit(":", 1)[1].strip("/"))
    return relay


def trusting(ca: CA, cert: Any = None, key: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def welcomed(url: str, token: str, context: ssl.SSLContext) -> Any:
    """A picows connection past HELLO over ``wss://``: (transport, listener, WELCOME frame)."""
    ws, c = await asyncio.wait_for(ws_open(url, ssl_context=context), TIMEOUT)
    ws.send(WSMsgType.BINARY, hello(token))
    frame = await c.next()
    assert frame.type == FrameType.WELCOME
    return ws, c, frame


async def test_hello_and_publish_over_wss_meet_a_tls_tcp_client(relay_factory, pki) -> None:
    ca, cert, key = pki
    relay = wss_relay(relay_factory, cert, key)
    ws, c, _ = await welcomed(relay.wss_url, relay.token("alice"), trusting(ca))
    assert ws.underlying_transport.get_extra_info("ssl_object") is not None
    # The client port speaks TLS with the same certificate: a tls:// client meets the wss one.
    import fenghuo
    bob = fenghuo.Client(f"tls://127.0.0.1:{relay.port}", token=relay.token("bob"),
                         tls_ca=str(ca.cert))
    relay.clients.append(bob)
    await bob.connect()
    ws.send(WSMsgType.BINARY, encode_publish("dm:alice:bob", b"over wss", request_id=2))
    assert (await c.next_of(FrameType.ACK)).request_id == 2
    (message,) = await collect(bob, 1)
    assert (message.sender, message.text) == ("alice", "over wss")
    ws.disconnect()


async def test_a_plaintext_websocket_is_refused_cleanly_on_a_tls_port(relay_factory, pki) -> None:
    ca, cert, key = pki
    # A long handshake timeout: the refusal must come from the TLS check, not from waiting.
    relay = wss_relay(relay_factory, cert, key, "--handshake-timeout", "60", workers=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.ws_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    # Closed at once (the TLS check), not upgraded and not held until the handshake timeout.
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    # Nothing was upgraded, nothing crashed, and TLS clients are still served.
    ws, _, _ = await welcomed(relay.wss_url, relay.token("alice"), trusting(ca))
    ws.disconnect()
    assert relay.proc.poll() is None
    assert "Traceback" not in relay.log()


async def test_a_wss_client_must_verify_the_server(relay_factory, pki, tmp_path) -> None:
    _, cert, key = pki
    relay = wss_relay(relay_factory, cert, key, workers=1)
    stranger = CA.create(tmp_path / "other", "stranger")
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(ws_open(relay.wss_url, ssl_context=trusting(stranger)), TIMEOUT)


async def test_mutual_tls_applies_to_the_websocket_port(relay_factory, pki) -> None:
    ca, cert, key = pki
    relay = wss_relay(relay_factory, cert, key, "--tls-client-ca", str(ca.cert), workers=1)
    try:
        ws, c = await asyncio.wait_for(ws_open(relay.wss_url, ssl_context=trusting(ca)), TIMEOUT)
    except (ssl.SSLError, OSError, EOFError):
        c = None
    # picows returns no listener for a connection closed before the upgrade;
    # with TLS 1.3 the refusal may also come after the handshake, on a read.
    if c is not None:
        ws.send(WSMsgType.BINARY, hello(relay.token("alice")))
        assert await c.next() is None
    device_cert, device_key = ca.issue("device-1", server=False)
    ws, _, _ = await welcomed(relay.wss_url, relay.token("alice"),
                              trusting(ca, device_cert, device_key))
    ws.disconnect()


async def test_sighup_reloads_the_websocket_certificate_too(relay_factory, pki, tmp_path) -> None:
    ca, cert, key = pki
    relay = wss_relay(relay_factory, cert, key, workers=1)
    held, held_c, _ = await welcomed(relay.wss_url, relay.token("carol"), trusting(ca))
    new_ca = CA.create(tmp_path / "next", "next-ca")
    new_cert, new_key = new_ca.issue("server-2")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    relay.signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while "TLS certificate reloaded" not in relay.log():
        assert time.monotonic() < deadline, relay.log()
        await asyncio.sleep(0.05)
    ws, _, _ = await welcomed(relay.wss_url, relay.token("dave"), trusting(new_ca))
    ws.disconnect()
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(ws_open(relay.wss_url, ssl_context=trusting(ca)), TIMEOUT)
    # The connection opened before the reload keeps working.
    held.send(WSMsgType.BINARY, encode_publish("dm:carol:dave", b"still here", request_id=2))
    assert (await held_c.next_of(FrameType.ACK)).request_id == 2
    held.disconnect()


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_js_client_over_wss(relay_factory, pki) -> None:
    ca, cert, key = pki
    relay = wss_relay(relay_factory, cert, key)
    # node trusts the test CA through NODE_EXTRA_CA_CERTS, as a deployment with a private CA would.
    env = {**os.environ, "FENGHUO_WS_URL": relay.wss_url, "FENGHUO_SECRET": relay.secret,
           "NODE_EXTRA_CA_CERTS": str(ca.cert)}
    flags = NODE_FLAGS if node_version() < (22,) else []
    done = subprocess.run([NODE, *flags, "--test", "--test-reporter=spec",
                           str(JS / "test" / "client.test.mjs")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + relay.log()[-3000:]
    assert "fail 0" in done.stdout, done.stdout
