"""Helpers for tests that drive the Python client."""

from __future__ import annotations

import asyncio
import time

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
