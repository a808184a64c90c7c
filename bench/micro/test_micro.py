"""Micro benchmarks of the compiled core beside the obvious pure-Python way.

Run: ``python -m pytest bench/micro --benchmark-enable --benchmark-group-by=group``
(see bench/README.md).  Setup stays outside the timed region; message size
and count go to ``extra_info``.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from typing import cast

import orjson
import pytest
from fenghuo.core import (
    Connection,
    FrameReader,
    Hub,
    Ring,
    encode_message,
    encode_publish,
)

PAYLOAD = b"x" * 64
CHANNEL = "dm:alice:bob"
FRAMES = 1000
_HEADER = struct.Struct(">IBBHI")
_PUBLISH = struct.Struct(">BBBH")


# ---------------------------------------------------------------- pure-Python peers

def py_encode_publish(channel: str, payload: bytes, key: bytes = b"", meta: bytes = b"",
                      request_id: int = 0) -> bytes:
    ch = channel.encode()
    body = _PUBLISH.pack(0, len(ch), len(key), len(meta)) + ch + key + meta + payload
    return _HEADER.pack(8 + len(body), 1, 0x10, 0, request_id) + body


def py_encode_json(channel: str, payload: bytes, request_id: int = 0) -> bytes:
    body = orjson.dumps({"channel": channel, "payload": payload.decode(), "rid": request_id})
    return len(body).to_bytes(4, "big") + body


def py_decode_stream(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos, end = [], 0, len(data)
    while end - pos >= 4:
        length, _version, ftype, _flags, rid = _HEADER.unpack_from(data, pos)
        if end - pos < length + 4:
            break
        out.append((ftype, rid, data[pos + 12:pos + 4 + length]))
        pos += length + 4
    return out


# ---------------------------------------------------------------- codec

@pytest.mark.benchmark(group="encode PUBLISH")
@pytest.mark.parametrize("impl", ["fenghuo.core", "struct", "orjson+length"])
def test_encode(benchmark, impl):
    fn = {"fenghuo.core": lambda: encode_publish(CHANNEL, PAYLOAD, request_id=7),
          "struct": lambda: py_encode_publish(CHANNEL, PAYLOAD, request_id=7),
          "orjson+length": lambda: py_encode_json(CHANNEL, PAYLOAD, 7)}[impl]
    benchmark.extra_info.update(payload_bytes=len(PAYLOAD), frames=1)
    benchmark(fn)


@pytest.mark.benchmark(group="decode stream")
@pytest.mark.parametrize("impl", ["fenghuo.core", "struct"])
def test_decode(benchmark, impl):
    stream = b"".join(encode_publish(CHANNEL, PAYLOAD, request_id=i) for i in range(FRAMES))
    benchmark.extra_info.update(payload_bytes=len(PAYLOAD), frames=FRAMES, stream_bytes=len(stream))
    if impl == "fenghuo.core":
        result = benchmark(lambda: FrameReader().feed(stream))
    else:
        result = benchmark(py_decode_stream, stream)
    assert len(result) == FRAMES


# ---------------------------------------------------------------- ring

@pytest.mark.benchmark(group="ring append+replay")
@pytest.mark.parametrize("impl", ["fenghuo.core", "deque"])
def test_ring(benchmark, impl):
    frame = encode_message(CHANNEL, 1, 0, "alice", PAYLOAD)
    benchmark.extra_info.update(frames=FRAMES, capacity=256)

    def core() -> int:
        ring = Ring(256)
        for seq in range(1, FRAMES + 1):
            ring.append(seq, frame)
        return len(ring.since(FRAMES - 100))

    def deque() -> int:
        ring: collections.deque = collections.deque(maxlen=256)
        for seq in range(1, FRAMES + 1):
            ring.append((seq, frame))
        return len([f for s, f in ring if s > FRAMES - 100])

    assert benchmark(core if impl == "fenghuo.core" else deque) == 100


# ---------------------------------------------------------------- fan-out

class _NullTransport:
    """A socket that takes everything: the flush runs, nothing is sent."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass


class _Sink:
    """What a pure-Python relay would keep per connection: a list of pending frames."""
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: list[bytes] = []


@pytest.mark.benchmark(group="fan-out to N")
@pytest.mark.parametrize("members", [100, 10_000])
@pytest.mark.parametrize("impl", ["fenghuo.core", "python"])
def test_fan_out(benchmark, impl, members):
    frame = encode_message("group:g", 1, 0, "alice", PAYLOAD)
    benchmark.extra_info.update(members=members, payload_bytes=len(PAYLOAD))
    loop = asyncio.new_event_loop()
    try:
        if impl == "fenghuo.core":
            hub = Hub(loop=loop)
            ch = hub.channel("group:g")
            conns = [Connection(hub) for _ in range(members)]
            for conn in conns:
                # A stand-in: the flush calls only what it defines.
                conn.transport = cast(asyncio.Transport, _NullTransport())
            ch.subscribers.update(conns)

            def run() -> None:
                hub.fan_out(ch, frame)

            def reset() -> None:
                hub.flush()           # the end of the loop iteration, minus the socket
        else:
            sinks = [_Sink() for _ in range(members)]

            def run() -> None:
                for sink in sinks:
                    sink.queue.append(frame)

            def reset() -> None:
                for sink in sinks:
                    sink.queue.clear()
        benchmark.pedantic(run, setup=reset, rounds=50, iterations=1)
    finally:
        loop.close()
