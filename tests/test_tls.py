"""TLS on the client port, and ``tls://`` in the client and the CLI, against real relays.

Certificates come from a CA made in the test (tests/certs.py).  The relays run
the default deployment (one worker per core) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time

import pytest

import fenghuo
from fenghuo.api import AsyncApi
from tests.certs import CA
from tests.clients import collect
from tests.test_cli import fenghuo_cli


@pytest.fixture
def pki(tmp_path):
    ca = CA.create(tmp_path / "pki")
    cert, key = ca.issue("server")
    return ca, cert, key


def tls_url(relay) -> str:
    return f"tls://localhost:{relay.port}"


def tls_relay(relay_factory, cert, key, *flags: str, **kwargs):
    return relay_factory("--tls-cert", str(cert), "--tls-key", str(key), *flags, **kwargs)


async def test_a_direct_message_over_tls_with_the_default_deployment(relay_factory, pki):
    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key)
    alice = fenghuo.Client(tls_url(relay), token=relay.token("alice"), tls_ca=str(ca.cert))
    bob = fenghuo.Client(tls_url(relay), token=relay.token("bob"), tls_ca=str(ca.cert))
    relay.clients += [alice, bob]
    await alice.connect()
    await bob.connect()
    ack = await alice.send("bob", "over tls")
    (message,) = await collect(bob, 1)
    assert (message.sender, message.text, message.seq) == ("alice", "over tls", ack.seq)


async def test_a_server_certificate_from_another_ca_is_refused(relay_factory, pki, tmp_path):
    _, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, workers=1)
    stranger = CA.create(tmp_path / "other", "stranger")
    client = fenghuo.Client(tls_url(relay), token=relay.token("alice"), tls_ca=str(stranger.cert),
                            reconnect=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    # Without a CA option the system CAs are used, which do not know ours either.
    client = fenghuo.Client(tls_url(relay), token=relay.token("alice"), reconnect=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()


async def test_a_plaintext_client_gets_nothing_from_a_tls_port(relay_factory, pki):
    _, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, workers=1)
    client = fenghuo.Client(relay.server, token=relay.token("alice"), reconnect=False,
                            connect_timeout=3)
    with pytest.raises((fenghuo.FenghuoError, OSError, asyncio.TimeoutError)):
        await client.connect()
    assert client.user is None


async def test_tls_url_never_falls_back_to_plaintext(relay):
    client = fenghuo.Client(f"tls://{relay.host}:{relay.port}", token=relay.token("alice"),
                            reconnect=False, connect_timeout=3)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
        await client.connect()
    assert client.user is None
    rc, out, err = await fenghuo_cli("send", "--server", f"tls://{relay.host}:{relay.port}",
                                     "--user", "alice", f"--secret={relay.secret}",
                                     "--to", "bob", "secret text")
    assert rc == 1 and out == ""
    assert err.startswith("fenghuo: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:7700", "http://127.0.0.1:7700", "tls+x://h:1"])
async def test_an_unsupported_scheme_is_a_one_line_error(relay, url):
    with pytest.raises(ValueError, match="tcp:// or tls://"):
        fenghuo.Client(url, token=relay.token("alice"))
    rc, out, err = await fenghuo_cli("send", "--server", url, "--user", "alice",
                                     f"--secret={relay.secret}", "--to", "bob", "x")
    assert (rc, out) == (1, "")
    assert err.startswith("fenghuo: unsupported server URL") and err.count("\n") == 1


async def test_the_cli_sends_over_tls_with_its_ca_option(relay_factory, pki):
    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key)
    rc, out, err = await fenghuo_cli("send", "--server", tls_url(relay), "--tls-ca", str(ca.cert),
                                     "--user", "alice", f"--secret={relay.secret}",
                                     "--to", "bob", "hi")
    assert (rc, out) == (0, "sent dm:alice:bob #1\n"), err


async def test_mutual_tls_refuses_a_client_without_a_certificate(relay_factory, pki):
    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, "--tls-client-ca", str(ca.cert))
    anonymous = fenghuo.Client(tls_url(relay), token=relay.token("alice"), tls_ca=str(ca.cert),
                               reconnect=False, connect_timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, fenghuo.ConnectionLost)):
        await anonymous.connect()
    assert anonymous.user is None
    client_cert, client_key = ca.issue("device-1", server=False)
    client = fenghuo.Client(tls_url(relay), token=relay.token("alice"), tls_ca=str(ca.cert),
                            tls_cert=str(client_cert), tls_key=str(client_key))
    relay.clients.append(client)
    await client.connect()
    assert client.user == "alice"




@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_scheduled_and_api_messages_are_delivered_on_a_tls_relay(relay_factory, pki,
                                                                       mutual):
    """What the relay publishes itself (a SCHEDULE fired, an API publish) goes through the
    API's own sessions: on a relay whose client port speaks only TLS (and asks clients
    for a certificate) they reach their recipient as any message does."""
    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key,
                      *(("--tls-client-ca", str(ca.cert)) if mutual else ()), api=True)
    device_cert, device_key = ca.issue("device-1", server=False) if mutual else (None, None)
    ann, bob = (fenghuo.Client(tls_url(relay), token=relay.token(user), tls_ca=str(ca.cert),
                               tls_cert=device_cert and str(device_cert),
                               tls_key=device_key and str(device_key)) for user in ("ann", "bob"))
    relay.clients += [ann, bob]
    await ann.connect()
    await bob.connect()
    at = time.time() + 0.5
    scheduled = await ann.schedule("dm:ann:bob", "fee reminder", at)
    (fired,) = await collect(bob, 1, timeout=15)
    assert (fired.sender, fired.text, fired.channel) == ("ann", "fee reminder", scheduled.channel)
    assert fired.ts_us >= at * 1e6
    async with AsyncApi(relay.api_url, relay.api_key) as api:
        sent = await api.publish("dm:ann:bob", "paid, thank you", sender="ann")
    (confirmed,) = await collect(bob, 1, timeout=15)
    assert (confirmed.text, confirmed.seq) == ("paid, thank you", sent["seq"])
    assert "firing timers failed" not in relay.log()


async def test_sighup_reloads_the_certificate_in_every_worker(relay_factory, pki, tmp_path):
    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, workers=2)
    held = fenghuo.Client(tls_url(relay), token=relay.token("carol"), tls_ca=str(ca.cert))
    relay.clients.append(held)
    await held.connect()
    # A new CA signs a new certificate, written over the files the relay was started with.
    new_ca = CA.create(tmp_path / "next", "next-ca")
    new_cert, new_key = new_ca.issue("server-2")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    relay.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while relay.log().count("TLS certificate reloaded") < 2:
        assert time.monotonic() < deadline, relay.log()
        await asyncio.sleep(0.05)
    # Every worker now presents the new certificate: seen from both worker indexes.
    seen: set[int] = set()
    for _ in range(40):
        client = fenghuo.Client(tls_url(relay), token=relay.token("dave"),
                                tls_ca=str(new_ca.cert), reconnect=False)
        await client.connect()
        seen.add(client.welcome["worker"])
        await client.close()
        if seen == {0, 1}:
            break
    assert seen == {0, 1}
    # The old CA no longer verifies a new connection, and the open one still works.
    stale = fenghuo.Client(tls_url(relay), token=relay.token("erin"), tls_ca=str(ca.cert),
                           reconnect=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        await stale.connect()
    assert (await held.send("dave", "still here")).seq == 1
    assert relay.proc.poll() is None and "worker exited" not in relay.log()


async def test_a_bad_certificate_stops_the_start_with_one_line(tmp_path):
    rc, out, err = await fenghuo_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                                     "--tls-cert", str(tmp_path / "missing.pem"))
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("fenghuo: cannot use the TLS certificate")


async def test_over_the_handshake_limit_a_tls_client_gets_try_again(relay_factory, pki):
    # The refusal is written inside TLS, which has no half-close: the relay
    # drains until the client closes (PROTOCOL §6.12), without an error of its own.
    from fenghuo.core import ErrorCode, FrameReader, FrameType, decode_error

    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, "--max-handshakes", "1", workers=1)
    context = ssl.create_default_context(cafile=str(ca.cert))
    _, first = await asyncio.open_connection("127.0.0.1", relay.port, ssl=context)
    await asyncio.sleep(0.2)              # past its TLS handshake, not past HELLO
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, ssl=context)
    frames = FrameReader()
    got: list = []
    while not got:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "closed before the ERROR"
        got = frames.feed(chunk)
    (frame,) = got
    assert frame.type == FrameType.ERROR
    assert decode_error(frame.body)[0] == ErrorCode.TRY_AGAIN
    writer.close()
    first.close()
    assert "NotImplementedError" not in relay.log() and "Traceback" not in relay.log()


async def test_a_connection_in_its_tls_handshake_is_not_counted_and_is_cut_after_the_timeout(
        relay_factory, pki):
    # DESIGN "Limits": TLS handshakes are not counted by max_handshakes (the
    # session, which counts, exists once the TLS handshake is done); the TLS
    # layer's ssl_handshake_timeout, the relay's handshake_timeout, bounds one.
    from tests.rawwire import open_raw

    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, "--max-handshakes", "1",
                      "--handshake-timeout", "1", workers=1)
    stalled = await open_raw(relay)       # connected, never starts its TLS handshake
    await asyncio.sleep(0.2)
    client = fenghuo.Client(tls_url(relay), token=relay.token("alice"), tls_ca=str(ca.cert),
                            reconnect=False)
    relay.clients.append(client)
    await client.connect()                # the one handshake slot was free: admitted
    # Cut by the relay's timeout of 1 s (asyncio's own would wait 60).
    await stalled.expect_closed(timeout=20)


def _fatal_error_then_wait(port: int, ca: CA) -> tuple[int, float]:
    """A client that sends a frame over max_frame with its body, reads the ERROR and
    the server's close_notify, and then never closes: ``(error code, seconds from
    the close_notify to the server's TCP close)``."""
    import os
    import select
    import socket

    from fenghuo.core import FrameReader, FrameType, decode_error
    from tests.rawwire import header

    context = ssl.create_default_context(cafile=str(ca.cert))
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="localhost") as tls:
        # Still sending (the body it announced) when the server has decided: the
        # ERROR must not be lost to a reset of the unread bytes.
        tls.sendall(header(2 << 20, FrameType.PUBLISH) + bytes(2 << 20))
        frames, got = FrameReader(), []
        while not got:
            chunk = tls.recv(65536)
            assert chunk, "closed before the ERROR"
            got = frames.feed(chunk)
        assert got[0].type == FrameType.ERROR
        assert tls.recv(65536) == b""         # close_notify: TLS's half-close
        closed_notify = time.monotonic()
        with socket.socket(fileno=os.dup(tls.fileno())) as tcp:
            readable, _, _ = select.select([tcp], [], [], 25)
            assert readable, "the server kept the connection 25 s after its close_notify"
            try:
                assert tcp.recv(1) == b""
            except ConnectionResetError:
                pass                          # closed either way: the linger is over
        return decode_error(got[0].body)[0], time.monotonic() - closed_notify


async def test_a_fatal_error_over_tls_is_read_and_the_close_lingers_as_on_tcp(relay_factory, pki):
    # PROTOCOL §4, "What fatal means": the ERROR, then the half-close (on TLS
    # its close_notify), then the server reads and discards until the client
    # closes or 5 s pass. The TLS layer's own default waited 30 s.
    from fenghuo.core import LINGER_S, ErrorCode

    ca, cert, key = pki
    relay = tls_relay(relay_factory, cert, key, workers=1)
    code, lingered = await asyncio.to_thread(_fatal_error_then_wait, relay.port, ca)
    assert code == ErrorCode.FRAME_TOO_LARGE
    assert LINGER_S - 1 < lingered < LINGER_S + 10
    assert "Traceback" not in relay.log()
