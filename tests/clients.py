"""Helpers for tests that drive the Python client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

import fenghuo

QUIET = 0.3   # how long "nothing more arrives" is watched for


async def collect(client: fenghuo.Client, n: int, timeout: float = 5.0) -> list[fenghuo.Message]:
    """The next ``n`` messages of ``client``, each awaited for at most ``timeout``."""
    return [await client.next_message(timeout=timeout) for _ in range(n)]


async def assert_silent(client: fenghuo.Client, wait: float = QUIET) -> None:
    """Nothing more arrives at ``client`` within ``wait`` seconds."""
    with pytest.raises(asyncio.TimeoutError):
        extra = await client.next_message(timeout=wait)
        pytest.fail(f"unexpected message {extra!r}")


async def refused(call, status: int, code: int):
    """The server API's refusal of ``call``: HTTP ``status``, protocol error ``code``."""
    from fenghuo.api import ApiError

    with pytest.raises(ApiError) as info:
        await call
    assert (info.value.status, info.value.code) == (status, code), info.value
    assert info.value.name == fenghuo.ErrorCode(code).name
    return info.value


async def wait_logged(relay, text: str, count: int, timeout: float = 10.0) -> None:
    """Wait until the relay's log holds ``text`` ``count`` times (once per worker, say)."""
    deadline = time.monotonic() + timeout
    while relay.log().count(text) < count:
        assert time.monotonic() < deadline, relay.log()[-3000:]
        await asyncio.sleep(0.05)


class WindowedPublisher:
    """One client publishing without pause, ``window`` publishes in flight, each ack recorded.

    ``pick(n)`` names the ``n``-th publish (from 1) as ``(channel, text)``;
    ``acked[channel]`` gets ``(seq, text)`` for each ack, in the order the acks
    arrive.  The Python client re-sends what is unacknowledged after a
    reconnect, so this is the load of the crash tests: stop it with
    :meth:`stop`, and :meth:`run` returns once everything in flight is answered.
    """

    def __init__(self, client: fenghuo.Client, pick: Callable[[int], tuple[str, str]],
                 window: int, acked: dict[str, list[tuple[int, str]]] | None = None) -> None:
        self.client = client
        self.pick = pick
        self.window = window
        self.acked: dict[str, list[tuple[int, str]]] = {} if acked is None else acked
        self.running = True

    def stop(self) -> None:
        self.running = False

    async def _one(self, channel: str, text: str) -> None:
        ack = await self.client.publish(channel, text)
        self.acked.setdefault(channel, []).append((ack.seq, text))

    async def run(self) -> int:
        """Publish until stopped; the number of publishes sent."""
        n = 0
        pending: set[asyncio.Future[None]] = set()
        while self.running:
            n += 1
            pending.add(asyncio.ensure_future(self._one(*self.pick(n))))
            if len(pending) >= self.window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        await asyncio.gather(*pending)
        return n
