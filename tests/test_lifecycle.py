"""The connection lifecycle: handshake and idle timeouts, graceful shutdown,
and what ``/metrics`` and ``/healthz`` say about it all.

Real ``fenghuo serve`` processes over real TCP, like tests/test_adversity.py
(whose raw-connection helpers live in tests/rawwire.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct

import orjson
import pytest
from fenghuo.core import ErrorCode, FrameType
from rawwire import (
    TIMEOUT,
    authed_on_every_worker,
    authed_raw,
    error_count,
    header,
    http_get,
    metrics,
    open_raw,
    wait_for_metric,
    worker_pid,
)

from fenghuo.protocol import encode_frame, encode_json, encode_publish

# ================================================================ handshake timeout

async def test_silent_connection_gets_hello_timeout(relay_factory):
    relay = relay_factory("--handshake-timeout", "0.5")
    alice = await relay.connect("alice")
    conn = await open_raw(relay)
    await conn.expect_silence(0.2)          # not before its time
    await conn.expect_error(ErrorCode.HELLO_TIMEOUT, request_id=0)
    await conn.expect_closed()
    # An authenticated connection is not subject to the handshake deadline.
    await asyncio.sleep(0.3)
    assert alice.connected
    assert (await alice.send("bob", "still here")).seq == 1


async def test_pings_do_not_stand_in_for_hello(relay_factory):
    relay = relay_factory("--handshake-timeout", "0.5")
    conn = await open_raw(relay)
    pongs = 0
    while True:
        conn.write(encode_frame(FrameType.PING, b"", pongs + 1))
        frame = await conn.frame()
        if frame.type != FrameType.PONG:
            break
        pongs += 1
        await asyncio.sleep(0.05)
    assert frame.type == FrameType.ERROR
    assert struct.unpack(">H", frame.body[:2])[0] == ErrorCode.HELLO_TIMEOUT
    await conn.expect_closed()
    assert pongs >= 3


async def test_hello_trickled_slower_than_the_deadline_gets_hello_timeout(relay_factory):
    relay = relay_factory("--handshake-timeout", "0.5")
    conn = await open_raw(relay)
    hello = encode_json(FrameType.HELLO, {"token": relay.token("mallory")}, 1)
    trickle = asyncio.create_task(conn.trickle(hello, 1, pause=0.05))
    try:
        await conn.expect_error(ErrorCode.HELLO_TIMEOUT)
        await conn.expect_closed()
    finally:
        trickle.cancel()
        await asyncio.gather(trickle, return_exceptions=True)


# ================================================================ heartbeat and idle timeout

HEARTBEAT = ("--ping-interval", "0.3", "--idle-timeout", "1")


async def test_server_pings_a_quiet_connection_and_pong_keeps_it_open(relay_factory):
    relay = relay_factory(*HEARTBEAT)
    conn = await authed_raw(relay, "mallory")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0            # twice the idle timeout
    pings = 0
    while loop.time() < deadline:
        ping = await conn.expect(FrameType.PING)
        conn.write(encode_frame(FrameType.PONG, ping.body, ping.request_id))
        pings += 1
    assert pings >= 3
    conn.write(encode_publish("dm:mallory:zed", b"alive", request_id=9))
    assert (await conn.expect_ack(9)).seq == 1


async def test_unanswered_ping_leads_to_idle_timeout(relay_factory):
    relay = relay_factory(*HEARTBEAT)
    conn = await authed_raw(relay, "mallory")
    # One PING per silence, then the cut: nothing else in between.
    await conn.expect(FrameType.PING)
    await conn.expect_error(ErrorCode.IDLE_TIMEOUT, request_id=0)
    await conn.expect_closed()
    assert error_count(await metrics(relay), ErrorCode.IDLE_TIMEOUT) == 1


async def test_any_traffic_counts_as_alive(relay_factory):
    relay = relay_factory(*HEARTBEAT)
    conn = await authed_raw(relay, "mallory")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    rid = 0
    while loop.time() < deadline:   # the client's own PINGs, more often than the interval
        rid += 1
        conn.write(encode_frame(FrameType.PING, b"", rid))
        assert (await conn.expect(FrameType.PONG)).request_id == rid
        await asyncio.sleep(0.1)
    await conn.expect_silence(0.1)  # and so the server never needed to PING


async def test_python_client_answers_pings_and_stays_connected(relay_factory):
    relay = relay_factory(*HEARTBEAT)
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    links = (alice._proto, bob._proto)
    await asyncio.sleep(2.0)
    assert (alice._proto, bob._proto) == links, "a client was cut for idleness"
    assert (await alice.send("bob", "after the quiet")).seq == 1
    assert (await bob.next_message(timeout=TIMEOUT)).text == "after the quiet"
    samples = await metrics(relay)
    assert error_count(samples, ErrorCode.IDLE_TIMEOUT) == 0
    assert samples["fenghuo_connections"] == 2


# ================================================================ graceful shutdown

async def _wait_exit(relay, timeout: float) -> int:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, relay.proc.wait), timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_sends_goaway_closes_and_exits_0(relay_factory, sig):
    relay = relay_factory("--drain-timeout", "3")
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    carols = await authed_on_every_worker(relay, "carol")
    stranger = await open_raw(relay)            # connected, no HELLO yet
    acks = [await alice.send("bob", f"m{i}") for i in range(5)]
    assert [a.seq for a in acks] == [1, 2, 3, 4, 5]
    relay.signal(sig)

    for conn in (*carols, stranger):
        goaway = await conn.expect(FrameType.GOAWAY)
        assert goaway.type == 0x95
        body = orjson.loads(goaway.body)
        assert body["reason"] == "shutdown" and body["reconnect_after_ms"] >= 0
        await conn.expect_closed()
    # Each worker closed its listener before its first GOAWAY went out.
    with pytest.raises(ConnectionRefusedError):
        await open_raw(relay)
    assert await _wait_exit(relay, 3 + TIMEOUT) == 0
    # Everything acknowledged before the signal was delivered.
    got = [await bob.next_message(timeout=TIMEOUT) for _ in acks]
    assert [(m.seq, m.text) for m in got] == [(i, f"m{i - 1}") for i in range(1, 6)]
    log = relay.log()
    assert '"shutting down"' in log and '"left_behind":0' in log


async def test_stuck_client_cannot_hold_shutdown_past_the_drain_timeout(relay_factory):
    relay = relay_factory("--drain-timeout", "1.5", "--max-pending", str(64 << 20))
    alice = await relay.connect("alice")
    # carol never reads: 6 MiB is more than the kernel buffers between her and
    # the server hold (tcp_wmem caps the server's side at 4 MiB by default),
    # so the rest waits in the server's transport, which cannot finish closing.
    carol = await authed_raw(relay, "carol", rcvbuf=32 * 1024)
    carol.transport.pause_reading()
    for _ in range(96):
        await alice.send("carol", os.urandom(64 * 1024))
    others = await authed_on_every_worker(relay, "dave")
    relay.signal(signal.SIGTERM)
    for other in others:                        # every worker has begun to drain
        await other.expect(FrameType.GOAWAY)
        await other.expect_closed()

    # Draining: still up for the stuck one, refusing newcomers, unhealthy.
    assert relay.proc.poll() is None
    with pytest.raises(ConnectionRefusedError):
        await open_raw(relay)
    status, _, body = await http_get(relay.host, relay.metrics_port, "/healthz")
    assert (status, orjson.loads(body)["status"]) == (503, "draining")
    assert (await metrics(relay))["fenghuo_connections"] >= 1

    assert await _wait_exit(relay, 1.5 + TIMEOUT) == 0
    assert '"left_behind":1' in relay.log()
    carol.transport.resume_reading()
    while (frame := await carol.frame(timeout=TIMEOUT)) is not None:
        assert frame.type in (FrameType.MESSAGE, FrameType.GOAWAY)


# ================================================================ metrics and health

# Labels as a supervisor writes them too: worker="k" first, then the sample's own.
_LABEL = r'[a-z]+="[^"]*"'
_SAMPLE = re.compile(rf'^[a-z_]+(\{{{_LABEL}(,{_LABEL})*\}})? -?[0-9.e+-]+$'
                     rf'|^[a-z_]+\{{({_LABEL},)*le="\+Inf"\}} [0-9]+$')


async def test_deliveries_count_messages_caught_up_on_reconnect(relay):
    alice = await relay.connect("alice")
    for i in range(3):
        await alice.send("bob", f"while away {i}")
    for _ in range(3):
        await alice.next_message(timeout=TIMEOUT)        # her own device's copies
    bob = await relay.client("bob", sync_from_start=True).connect()
    assert [(await bob.next_message(timeout=TIMEOUT)).seq for _ in range(3)] == [1, 2, 3]
    # Three live copies to alice, three caught up by bob: six frames queued.
    samples = await wait_for_metric(relay, "fenghuo_deliveries_total", lambda v: v >= 6)
    assert samples["fenghuo_deliveries_total"] == 6


async def test_metrics_count_what_happened(relay):
    alice = await relay.connect("alice")
    bob = await relay.connect("bob")
    start = await metrics(relay)
    assert start["fenghuo_connections"] == 2 and start["fenghuo_users_online"] == 2

    # Seven accepted publishes and one duplicate (same idempotency key).
    for i in range(7):
        await alice.send("bob", f"m{i}", key=f"k{i}")
    assert (await alice.send("bob", "again", key="k6")).duplicate
    for _ in range(7):
        await bob.next_message(timeout=TIMEOUT)

    # Errors of three kinds from three offenders.
    pre = await open_raw(relay)
    pre.write(encode_publish("dm:alice:bob", b"x", request_id=1))
    await pre.expect_error(ErrorCode.HELLO_REQUIRED)
    bad = await open_raw(relay)
    bad.write(header(8, FrameType.PING, version=3))
    await bad.expect_error(ErrorCode.UNSUPPORTED_VERSION)
    odd = await authed_raw(relay, "mallory")
    odd.write(encode_frame(0x7E, b"", 2) + encode_frame(0x7E, b"", 3))
    await odd.expect_error(ErrorCode.UNKNOWN_FRAME_TYPE)
    await odd.expect_error(ErrorCode.UNKNOWN_FRAME_TYPE)
    await pre.expect_closed()
    await bad.expect_closed()

    samples = await wait_for_metric(relay, "fenghuo_connections", lambda v: v == 3)
    assert samples["fenghuo_users_online"] == 3
    assert error_count(samples, ErrorCode.HELLO_REQUIRED) == 1
    assert error_count(samples, ErrorCode.UNSUPPORTED_VERSION) == 1
    assert error_count(samples, ErrorCode.UNKNOWN_FRAME_TYPE) == 2
    assert samples["fenghuo_messages_published_total"] == 7
    assert samples["fenghuo_publish_duplicates_total"] == 1
    # alice's own device is subscribed to the direct channel too.
    assert samples["fenghuo_deliveries_total"] == 14

    # The latency histogram saw each sequenced publish once.
    name = "fenghuo_publish_to_deliver_seconds"
    buckets = [(k, v) for k, v in samples.items() if k.startswith(name + "_bucket")]
    assert buckets[-1][0] == name + '_bucket{le="+Inf"}'
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == samples[name + "_count"] == 7
    assert samples[name + "_sum"] > 0

    # Frames counted as received: exactly what one more connection sends.
    before = samples["fenghuo_frames_received_total"]
    odd.write(b"".join(encode_frame(FrameType.PING, b"", i) for i in range(10, 15)))
    for i in range(10, 15):
        await odd.expect(FrameType.PONG, request_id=i)
    after = await metrics(relay)
    assert after["fenghuo_frames_received_total"] == before + 5
    assert after["fenghuo_received_bytes_total"] == samples["fenghuo_received_bytes_total"] + 5 * 12


async def test_a_welcome_is_counted_as_one_frame_its_bytes_and_one_write(relay):
    # A WELCOME written at once (Connection.write_now, nothing queued before it)
    # is counted as the queue's flush counts what it writes.
    before = await metrics(relay)
    conn = await open_raw(relay)
    conn.write(encode_json(FrameType.HELLO, {"token": relay.token("alice")}, 1))
    welcome = await conn.expect(FrameType.WELCOME)
    after = await metrics(relay)
    assert after["fenghuo_frames_sent_total"] - before["fenghuo_frames_sent_total"] == 1
    assert after["fenghuo_sent_bytes_total"] - before["fenghuo_sent_bytes_total"] \
        == len(header(len(welcome.body), FrameType.WELCOME)) + len(welcome.body)
    assert after["fenghuo_writes_total"] - before["fenghuo_writes_total"] == 1


async def test_metrics_exposition_format(relay):
    await relay.connect("alice")
    status, headers, body = await http_get(relay.host, relay.metrics_port, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert text.endswith("\n")
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            families[family] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            assert _SAMPLE.match(line), f"not a Prometheus sample: {line!r}"
            family = re.sub(r"(_bucket|_sum|_count)$", "", line.split("{")[0].split(" ")[0])
            assert family in families, f"sample before its TYPE: {line!r}"
    for gauge in ("fenghuo_connections", "fenghuo_users_online", "fenghuo_channels"):
        assert families[gauge] == "gauge"
    for counter in ("fenghuo_frames_received_total", "fenghuo_errors_total",
                    "fenghuo_slow_consumer_disconnects_total",
                    "fenghuo_rate_limited_disconnects_total"):
        assert families[counter] == "counter"
    assert families["fenghuo_publish_to_deliver_seconds"] == "histogram"
    # Prometheus' naming conventions (prometheus.io/docs/practices/naming): one
    # prefix, counters end _total, a base unit is the last word before it.
    assert "fenghuo_build_info" in families and re.search(
        r'^fenghuo_build_info\{python="[^"]+",version="[^"]+"\} 1\.0$', text, re.M)
    for family, kind in families.items():
        assert re.fullmatch(r"fenghuo_[a-z0-9_]+", family), family
        assert family.endswith("_total") == (kind == "counter"), family
        for unit in ("seconds", "bytes"):
            if f"_{unit}" in family:
                assert family.removesuffix("_total").endswith(f"_{unit}"), f"{unit} not last: {family}"


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_worker_keeps_the_collector_off_its_startup_state(relay_factory, workers):
    """gc.freeze() once started (server/stalls.py): a full collection then skips what startup
    made; the loop's lag and the collector's pauses are counted for /metrics."""
    relay = relay_factory(workers=workers)
    await relay.connect("alice")
    await asyncio.sleep(0.1)                     # a few 10 ms lag samples
    _, _, body = await http_get(relay.host, relay.metrics_port, "/metrics")
    frozen = re.findall(r"^fenghuo_gc_frozen_objects(?:\{[^}]*\})? (\S+)$", body.decode(), re.M)
    assert len(frozen) == workers and all(float(n) > 1000 for n in frozen), frozen
    samples = await metrics(relay)
    assert samples['fenghuo_event_loop_lag_seconds_bucket{le="+Inf"}'] >= workers * 3
    assert samples["fenghuo_event_loop_lag_seconds_count"] >= workers * 3
    # Its own share, every sample less the loop thread's wait for a CPU (schedstat).
    assert samples["fenghuo_event_loop_own_lag_seconds_count"] == samples["fenghuo_event_loop_lag_seconds_count"]
    assert samples["fenghuo_event_loop_own_lag_seconds_sum"] <= samples["fenghuo_event_loop_lag_seconds_sum"]
    assert samples["fenghuo_event_loop_cpu_wait_seconds_total"] >= 0
    for generation in range(3):
        assert f'fenghuo_gc_pause_seconds_count{{generation="{generation}"}}' in samples


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_workers_loop_thread_asks_the_kernel_for_a_short_time_slice(relay_factory, workers):
    """--loop-slice-us (default 100): the kernel gives each worker's loop thread that slice
    (Linux 6.12+, server/stalls.py), /metrics says which; 0 leaves the kernel's own."""
    from fenghuo.server.stalls import thread_slice
    own = thread_slice()    # this test's thread: what the kernel gives when nobody asks
    if own == 0.0:
        pytest.skip("this kernel does not say a task's slice (sched_getattr)")
    for flags, expected in (((), 100e-6), (("--loop-slice-us", "250"), 250e-6), (("--loop-slice-us", "0"), own)):
        relay = relay_factory(*flags, workers=workers)
        await relay.connect("alice")
        pids = [relay.proc.pid] if workers == 1 else [worker_pid(relay, k) for k in range(workers)]
        assert [thread_slice(pid) for pid in pids] == [pytest.approx(expected)] * workers, flags
        slices = re.findall(r"^fenghuo_event_loop_slice_seconds(?:\{[^}]*\})? (\S+)$",
                            (await http_get(relay.host, relay.metrics_port, "/metrics"))[2].decode(), re.M)
        assert [float(v) for v in slices] == [pytest.approx(expected)] * workers, (flags, slices)
        relay.stop()


async def test_every_workers_collector_takes_the_young_threshold_it_is_given(relay_factory):
    """--gc-young-threshold (default 700, CPython's): each worker's cyclic collector runs
    its young generation at that threshold, /metrics says so."""
    for flags, expected in (((), 700), (("--gc-young-threshold", "7000"), 7000)):
        relay = relay_factory(*flags, workers=2)
        await relay.connect("alice")
        body = (await http_get(relay.host, relay.metrics_port, "/metrics"))[2].decode()
        thresholds = re.findall(r"^fenghuo_gc_young_threshold_objects(?:\{[^}]*\})? (\S+)$", body, re.M)
        assert [float(v) for v in thresholds] == [expected] * 2, (flags, thresholds)
        relay.stop()


async def test_healthz_and_unknown_paths(relay):
    alice = await relay.connect("alice")
    for path in ("/healthz", "/health", "/healthz?verbose=1"):
        status, headers, body = await http_get(relay.host, relay.metrics_port, path)
        assert status == 200 and headers["content-type"] == "application/json"
        health = orjson.loads(body)
        assert health["status"] == "ok"
        assert health["epoch"] == alice.epoch
        assert health["connections"] == 1
    for path in ("/", "/metrics/x", "/admin", "/../etc/passwd"):
        status, _, body = await http_get(relay.host, relay.metrics_port, path)
        assert status == 404, path


async def test_garbage_on_the_metrics_port_does_not_break_it(relay):
    junks = (b"\x00\xff" * 50, b"NOPE", header(8, FrameType.HELLO) * 4)
    for junk in (j + b"\r\n\r\n" for j in junks):
        reader, writer = await asyncio.open_connection(relay.host, relay.metrics_port)
        writer.write(junk)
        reply = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 404 ")
    assert (await metrics(relay))["fenghuo_connections"] == 0
