"""The benchmark's throughput window is end to end: a publisher keeps at most
two windows in flight to its subscriber, not merely to its own replies.

Real relay processes, real TCP, the compiled generator (bench/_gen.pyx).
Windowed on its replies alone, a publisher whose messages reached the
subscriber through another worker of the default deployment wrote on while
the deliveries queued up in the relay: publishes/s counted writes, and
many-to-many showed about half as many deliveries as publishes.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from bench import loadgen
from bench.targets import Fenghuo

WINDOW = 16


@pytest.fixture(params=[1, 2], ids=["one worker", "two workers"])
def target(request, tmp_path):
    target = Fenghuo(secrets.token_urlsafe(32), ("--store", "memory"), request.param)
    target.start(tmp_path)
    yield target
    target.stop()


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_publisher_waits_for_its_subscribers_deliveries_not_only_its_replies(target):
    setup = await loadgen.build_pairs(target, 1, 64, WINDOW, None)
    (publisher,), (subscriber,) = setup.publishers, setup.subscribers
    subscriber.pause_reading()
    publisher.start()
    # Its own ACKs and MESSAGEs keep coming; its subscriber takes nothing.
    await until(lambda: publisher.received > 0)
    await asyncio.sleep(0.5)
    assert publisher.published == 2 * WINDOW, "two windows, then it waits for the subscriber"
    subscriber.resume_reading()
    await until(lambda: publisher.published >= 20 * WINDOW)
    publisher.stop()
    await asyncio.sleep(0.2)
    # Every publish reaches the subscriber, and none is written past the window.
    await until(lambda: subscriber.received == publisher.published * setup.delivery_size)
    setup.close()
