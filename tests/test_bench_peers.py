"""The pub/sub peers (nats-server, redis-server) behind the bench's Target interface.

Real servers, real sockets: links come back quiet from ``connect``, and the
byte layout ``wire`` promises is what the servers really put on the wire.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers import INSTALL
from bench.peers.nats import Nats
from bench.peers.pubsub import PubSubPeer
from bench.peers.redis import Redis
from bench.targets import STAMP_SIZE, Wire, handed_over, peer_binary

STAMP = struct.Struct(">Q")
PAYLOAD = 64
FIRST_NATS_PING_S = 2.4
"""nats-server's first keep-alive PING comes within this many seconds of a connect."""


def installed(binary: str) -> bool:
    """Whether ``binary`` is here, after install.sh has had its chance."""
    if peer_binary(binary) is None:
        subprocess.run(["bash", str(INSTALL)], stdin=subprocess.DEVNULL, timeout=900,
                       check=False)
    return peer_binary(binary) is not None


@pytest.fixture(params=[Nats, Redis], ids=["nats", "redis"])
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PubSubPeer]:
    target = request.param()
    if not installed(target.binary):
        pytest.skip(f"{target.binary} is absent and bench/peers/install.sh could not install it")
    target.start(tmp_path)
    try:
        yield target
    finally:
        target.stop()


class Collector(asyncio.Protocol):
    """Takes over a handed-over link and keeps every byte that arrives."""

    def __init__(self, stream: asyncio.StreamWriter) -> None:
        self.stream = stream  # a collected StreamWriter would close the transport
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost = False
        stream.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.arrived.set()

    def write(self, data: bytes) -> None:
        self.stream.transport.write(data)

    async def take(self, size: int, timeout: float = 10.0) -> bytes:
        """Exactly the next ``size`` bytes."""
        async with asyncio.timeout(timeout):
            while len(self.data) < size:
                if self.lost:
                    raise ConnectionError(f"closed after {len(self.data)} of {size} bytes")
                self.arrived.clear()
                await self.arrived.wait()
        taken = bytes(self.data[:size])
        del self.data[:size]
        return taken

    def close(self) -> None:
        self.stream.transport.close()


def stamped_batch(wire: Wire, stamps: list[int]) -> bytes:
    """Copies of ``wire.publish`` with ``stamps`` patched in, as the generator writes them."""
    batch = bytearray()
    for stamp in stamps:
        frame = bytearray(wire.publish)
        STAMP.pack_into(frame, wire.publish_stamp, stamp)
        batch += frame
    return bytes(batch + wire.batch_trailer)


def delivered_stamps(wire: Wire, data: bytes) -> list[int]:
    """The stamp of each delivery in ``data``, checking the payload around it."""
    frames = [data[i:i + wire.delivery_size] for i in range(0, len(data), wire.delivery_size)]
    stamps = []
    for frame in frames:
        payload_at = wire.delivery_stamp + STAMP_SIZE - PAYLOAD
        assert frame[payload_at:wire.delivery_stamp] == bytes(PAYLOAD - STAMP_SIZE), frame
        stamps.append(STAMP.unpack_from(frame, wire.delivery_stamp)[0])
    return stamps


async def test_stamped_publishes_reach_every_subscriber_in_order(peer: PubSubPeer) -> None:
    channel, elsewhere = peer.group("lobby"), peer.group("elsewhere")
    # The first subscriber has two subscriptions, so it receives on its second.
    links = await asyncio.gather(peer.connect("sub-0", (elsewhere, channel)),
                                 peer.connect("sub-1", (channel,)),
                                 peer.connect("pub"))
    sub0, sub1, pub = (Collector(link) for link in links)
    wire = peer.wire(channel, "pub", PAYLOAD, subscribers=2)
    stamps = [1_000_000_007 * (i + 1) for i in range(5)]

    pub.write(stamped_batch(wire, stamps))

    for sub in (sub0, sub1):
        assert delivered_stamps(wire, await sub.take(len(stamps) * wire.delivery_size)) == stamps
    reply = await pub.take(len(stamps) * wire.reply_per_publish + wire.trailer_reply)
    assert reply == {"nats": b"PONG\r\n", "redis": b":2\r\n" * len(stamps)}[peer.name]
    await asyncio.sleep(0.2)
    assert not (sub0.data or sub1.data or pub.data), "bytes beyond what the wire promised"
    for link in (sub0, sub1, pub):
        link.close()


async def test_links_stay_quiet_after_connect(peer: PubSubPeer) -> None:
    """No keep-alive or greeting reaches a handed-over link (nats-server PINGs at ~2 s)."""
    links = [Collector(link) for link in await asyncio.gather(
        peer.connect("quiet-sub", (peer.direct("a", "b"),)), peer.connect("quiet-pub"))]
    await asyncio.sleep(FIRST_NATS_PING_S + 0.3)
    assert [bytes(link.data) for link in links] == [b"", b""]
    for link in links:
        link.close()


async def test_open_is_a_clients_connect_and_settle_answers_what_comes_later(
        peer: PubSubPeer) -> None:
    """``open`` returns after the handshake's own round trip, as a client library's
    connect does, without waiting for nats-server's first keep-alive PING (the
    ``connections`` scenario times ``open``); ``settle`` then takes and answers
    that PING, and the link stays quiet.
    """
    channel = peer.direct("open-a", "open-b")
    sub, pub = await asyncio.gather(peer.open("open-a", (channel,)), peer.open("open-b"))
    # Ready on return: a publish reaches the subscriber before anything was settled.
    wire = peer.wire(channel, "open-b", PAYLOAD, subscribers=1)
    pub.writer.write(stamped_batch(wire, [42]))
    delivery = await asyncio.wait_for(sub.reader.readexactly(wire.delivery_size), 10)
    assert STAMP.unpack_from(delivery, wire.delivery_stamp)[0] == 42
    reply = await asyncio.wait_for(
        pub.reader.readexactly(wire.reply_per_publish + wire.trailer_reply), 10)
    # nats-server's PING is owed, not yet come (it comes at 2 s at the earliest).
    assert [sub.quiet, pub.quiet] == [peer.name != "nats"] * 2
    await asyncio.gather(peer.settle(sub), peer.settle(pub))
    assert sub.quiet and pub.quiet
    links = [Collector(handed_over(link.reader, link.writer)) for link in (sub, pub)]
    await asyncio.sleep(FIRST_NATS_PING_S + 0.3)
    assert [bytes(link.data) for link in links] == [b"", b""]
    assert not any(link.lost for link in links)
    assert reply == {"nats": b"PONG\r\n", "redis": b":1\r\n"}[peer.name]
    for link in links:
        link.close()


async def test_a_subscriber_that_stops_reading_is_not_cut_off(peer: PubSubPeer) -> None:
    """More than the server's default per-client limit waits for a paused subscriber.

    Defaults would disconnect it: redis at 32 MiB (pubsub hard limit), nats
    at 64 MiB (max_pending).
    """
    channel = peer.direct("slow", "fast")
    payload, count = 512 * 1024, 160  # 80 MiB
    sub_link, pub_link = await asyncio.gather(peer.connect("slow", (channel,)),
                                              peer.connect("fast"))
    sub, pub = Collector(sub_link), Collector(pub_link)
    sub_link.transport.pause_reading()
    wire = peer.wire(channel, "fast", payload, subscribers=1)
    pub.write(stamped_batch(wire, list(range(count))))
    await pub.take(count * wire.reply_per_publish + wire.trailer_reply, timeout=60)

    sub_link.transport.resume_reading()
    data = await sub.take(count * wire.delivery_size, timeout=60)
    assert [STAMP.unpack_from(data, i * wire.delivery_size + wire.delivery_stamp)[0]
            for i in range(count)] == list(range(count))
    sub.close()
    pub.close()


def test_stop_leaves_no_process(peer: PubSubPeer) -> None:
    pid, port = peer.pid, peer.port
    peer.stop()
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(OSError):
        socket.create_connection((peer.host, port), timeout=1).close()


def test_port_is_below_the_ephemeral_range(peer: PubSubPeer) -> None:
    # A port from the ephemeral range (the kernel's pick of port 0) can be
    # taken by any outgoing connection between the pick and the server's bind.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert peer.port < low


@pytest.mark.parametrize("peer_class", [Nats, Redis], ids=["nats", "redis"])
def test_the_server_dies_with_the_bench_that_started_it(peer_class: type[PubSubPeer],
                                                        tmp_path: Path) -> None:
    # A bench killed mid-run (SIGKILL: nothing of it runs to stop its
    # targets) must not leave its server running, holding a port and a CPU.
    if not installed(peer_class.binary):
        pytest.skip(f"{peer_class.binary} is absent")
    script = (f"import sys, time; from pathlib import Path; "
              f"from {peer_class.__module__} import {peer_class.__name__} as P; "
              f"t = P(); t.start(Path(sys.argv[1])); print(t.pid, flush=True); time.sleep(60)")
    bench = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                             stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert bench.stdout is not None
        server = int(bench.stdout.readline())
        assert Path(f"/proc/{server}").exists()
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 10
    while not gone(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone(server):
        os.kill(server, signal.SIGKILL)           # leave nothing behind either way
        pytest.fail(f"{peer_class.binary} {server} outlived the bench that started it")


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for init to reap it counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("payload, subscribers, sizes", [
    # (publish, publish stamp, delivery, delivery stamp, reply per publish, trailer reply)
    (64, 2, {"nats": (95, 85, 102, 92, 0, 6), "redis": (115, 105, 115, 105, 4, 0)}),
    (8, 10_000, {"nats": (38, 28, 45, 35, 0, 6), "redis": (58, 48, 58, 48, 8, 0)}),
])
def test_wire_layout_of_a_twenty_character_channel(payload: int, subscribers: int,
                                                   sizes: dict[str, tuple[int, ...]]) -> None:
    for target in (Nats(), Redis()):
        channel = target.group("a" * (20 - len(target.group(""))))
        assert len(channel) == 20
        wire = target.wire(channel, "sender", payload, subscribers)
        assert (len(wire.publish), wire.publish_stamp, wire.delivery_size, wire.delivery_stamp,
                wire.reply_per_publish, wire.trailer_reply) == sizes[target.name]


# --- install.sh --------------------------------------------------------------------------

def fake_tools(tmp_path: Path, log: Path) -> dict[str, str]:
    """An environment whose apt-get, sudo, service and systemctl only log their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "sudo", "service", "systemctl"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 0\n')
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_install_does_nothing_when_both_peers_are_present(tmp_path: Path) -> None:
    if not (peer_binary("nats-server") and peer_binary("redis-server")):
        pytest.skip("needs both peers installed")
    log = tmp_path / "calls"
    run = subprocess.run(["bash", str(INSTALL)], check=False, capture_output=True, text=True,
                         timeout=60, env=fake_tools(tmp_path, log))
    assert run.returncode == 0, run.stderr
    assert "already installed" in run.stdout
    assert not log.exists(), log.read_text()


def test_install_asks_apt_for_a_missing_peer_and_fails_when_it_stays_missing(
        tmp_path: Path) -> None:
    """nats-server hidden in a private mount namespace; apt-get 'succeeds' but installs nothing."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], check=False,
                                         capture_output=True).returncode:
        pytest.skip("needs unshare with user and mount namespaces")
    nats = peer_binary("nats-server") or pytest.skip("needs nats-server installed")
    hide = tmp_path / "not-executable"
    hide.write_text("")
    log = tmp_path / "calls"
    run = subprocess.run(
        [unshare, "-rm", "sh", "-c", f'mount --bind "$0" {nats} && exec bash "$1"', hide, INSTALL],
        check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=fake_tools(tmp_path, log))
    assert run.returncode != 0
    assert "apt-get installed nats-server but no nats-server binary" in run.stderr
    calls = log.read_text().splitlines()
    assert calls[0].endswith("apt-get -y -qq install --no-install-recommends nats-server")
    assert "nats-server stop" in calls[-1] or "disable --now nats-server" in calls[-1]


async def test_redis_links_authenticate_as_a_client_given_a_password_does(tmp_path: Path) -> None:
    """The bench's redis-server needs a password (requirepass): a link that skips AUTH is
    refused, and ``open`` (the connect ``run connections`` times) is AUTH answered +OK,
    as fenghuo's connect is a HELLO whose token the relay verifies."""
    redis = Redis()
    if not installed(redis.binary):
        pytest.skip("redis-server is absent and bench/peers/install.sh could not install it")
    redis.start(tmp_path)
    try:
        reader, writer = await asyncio.open_connection(redis.host, redis.port)
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        refused = await asyncio.wait_for(reader.readline(), 10)
        assert refused.startswith(b"-NOAUTH"), refused
        writer.close()
        publisher = await redis.open("alice")
        publisher.writer.write(b"*1\r\n$4\r\nPING\r\n")
        assert await asyncio.wait_for(publisher.reader.readline(), 10) == b"+PONG\r\n"
        publisher.writer.close()
    finally:
        redis.stop()


async def test_fenghuo_links_say_hello_with_the_tokens_made_beforehand(tmp_path: Path) -> None:
    """``prepare`` makes every user's token before ``run connections`` starts its clock, and
    ``open`` sends that one: made with the relay's secret, it is accepted even once the
    target's secret is no longer the relay's (a token made at connect would not be)."""
    from bench.targets import Fenghuo
    relay = Fenghuo("the-relay-s-secret-" + "x" * 32, ("--store", "memory"), 1)
    relay.start(tmp_path)
    try:
        relay.prepare(["alice", "bob"])
        relay.secret = "another-secret-" + "y" * 32
        for user in ("alice", "bob"):
            link = await relay.open(user)
            link.writer.close()
        with pytest.raises(RuntimeError, match="refused HELLO"):
            await relay.open("carol")     # no token made beforehand: made now, with the wrong secret
    finally:
        relay.stop()
