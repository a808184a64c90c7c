"""Micro benchmark: a publish through the hub with and without an idempotency key.

Run: ``python -m pytest bench/micro/test_keys_hub.py --benchmark-enable``
(bench/README.md "Idempotency keys").

The relay's own work per publish, without sockets or the event loop: one
connection's reads of ``BATCH`` PUBLISH frames each go through
``Connection.buffer_updated`` (framing, the dedupe window, sequencing, the
ring, the MESSAGE to the one subscriber and the ACK, both to a transport
that drops them), as on one worker with ``--store memory``.  Each round
is one read, its keys new (made before the round: the Python client's keys,
``fenghuo.client.new_key``, or random ones), into a window already full,
so every keyed publish also evicts the oldest key.  Divide a round's time
by ``BATCH`` for a publish's; keyed minus unkeyed is what a key costs.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from typing import cast

import pytest
from fenghuo.client import new_key
from fenghuo.core import Connection, Hub, encode_publish

BATCH = 64
CHANNEL = "dm:user-000001:user-000002"
PAYLOAD = bytes(64)

KEYS: dict[str, Callable[[], bytes] | None] = {
    "none": None,
    "time-ordered (new_key)": new_key,
    "random": lambda: secrets.token_bytes(12).hex().encode(),
}


class _Loop:
    """Just enough of an event loop for Hub: the flush runs when the round ends."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def call_soon(self, callback, *args):
        self.callbacks.append((callback, args))

    def call_later(self, delay, callback, *args):
        pass

    def run(self) -> None:
        while self.callbacks:
            callback, args = self.callbacks.pop(0)
            callback(*args)


class _NullTransport:
    def write(self, data) -> None:
        pass

    def writelines(self, chunks) -> None:
        pass

    def close(self) -> None:
        pass

    abort = close

    def is_closing(self) -> bool:
        return False


class _Publisher(Connection):
    def resolve_publish(self, channel: bytes):
        return self.hub.channel(channel.decode())


@pytest.mark.benchmark(group="publish through the hub")
@pytest.mark.parametrize("window", [4096, 65536])
@pytest.mark.parametrize("keys", list(KEYS))
def test_publish_through_the_hub(benchmark, keys, window):
    loop = _Loop()
    # Stand-ins: the hub calls only what they define.
    hub = Hub(loop=cast(asyncio.AbstractEventLoop, loop), compress_threshold=0, dedupe_window=window, rate=1e12, burst=1e12)
    sender, receiver = _Publisher(hub), _Publisher(hub)
    for conn, user in ((sender, "user-000001"), (receiver, "user-000002")):
        conn.connection_made(cast(asyncio.BaseTransport, _NullTransport()))
        conn.authenticated, conn.user, conn.user_key = True, user, user.encode()
    hub.channel(CHANNEL).subscribers.add(receiver)
    make_key = KEYS[keys]
    request_ids = itertools.count(1)

    def read() -> bytes:
        return b"".join(encode_publish(CHANNEL, PAYLOAD, key=make_key() if make_key else b"",
                                       request_id=next(request_ids)) for _ in range(BATCH))

    def publish(data: bytes) -> None:
        sender.get_buffer(-1)[:len(data)] = data
        sender.buffer_updated(len(data))
        loop.run()

    for _ in range(window // BATCH + 1):       # fill the window: every key from now evicts one
        publish(read())
    reads = [0]

    def timed(data: bytes) -> None:
        publish(data)
        reads[0] += 1

    before = hub.metrics.publishes
    benchmark.extra_info.update(publishes_per_round=BATCH, window=window)
    benchmark.pedantic(timed, setup=lambda: ((read(),), {}), rounds=400, iterations=1)
    assert reads[0] and hub.metrics.publishes - before == reads[0] * BATCH   # none a duplicate
    assert len(hub.channel(CHANNEL).dedupe) == (window if make_key else 0)
