"""``python -m bench api``: publishing through the server API against publishing over the protocol.

One relay (``--workers 1``, pinned like every target, with the API on), one
generator process, both paths in the same run: for each path, ``--count``
publishes one at a time (latency: call to answer) and then ``--count`` with
``--concurrency`` in flight (throughput).  The protocol path is one
``fenghuo.Client`` (a publish's time is until its ACK); the API path is one
aiohttp session with keep-alive (until its HTTP answer, which carries the
same ACK).  The figures are ratios of the two, as bench/README.md reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp
import orjson
import uvloop

from bench.options import add_publish_options
from bench.targets import GENERATOR_CPU, Fenghuo, free_port, pin, wait_listening

CHANNEL = "org.bench.api"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("api", help="server API publish against protocol publish (bench/api.py)")
    add_publish_options(p, count=2000)
    p.add_argument("--relay", default="--store memory", metavar="FLAGS",
                   help="extra `fenghuo serve` flags (default: --store memory)")
    p.set_defaults(func=cmd_api)


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "mean_ms": 1000 * statistics.fmean(ordered)}


async def _measure(publish: Callable[[int], Awaitable[object]], count: int,
                   concurrency: int) -> dict[str, float]:
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await publish(i)
        latencies.append(time.perf_counter() - started)
    queue = iter(range(count, 2 * count))

    async def worker() -> None:
        for i in queue:
            await publish(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**_summary(latencies), "per_s": count / (time.perf_counter() - started)}


async def _run(target: Fenghuo, api_port: int, key: str, a: argparse.Namespace) -> dict:
    import fenghuo

    payload = "x" * a.payload
    client = fenghuo.Client(f"tcp://127.0.0.1:{target.port}", user="bench-pub", secret=target.secret,
                            channels=(CHANNEL,), reconnect=False)
    await client.connect()
    results = {}
    try:
        results["protocol"] = await _measure(lambda i: client.publish(CHANNEL, payload),
                                             a.count, a.concurrency)
    finally:
        await client.close()
    url = f"http://127.0.0.1:{api_port}/api/publish"
    connector = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
        async def publish(i: int) -> object:
            body = orjson.dumps({"channel": CHANNEL, "data": payload, "sender": "bench-pub"})
            async with http.post(url, data=body) as response:
                if response.status != 200:
                    raise RuntimeError(await response.text())
                return await response.read()

        await publish(-1)          # the API's session for the sender is made on first use
        results["api"] = await _measure(publish, a.count, a.concurrency)
    return results


def cmd_api(a: argparse.Namespace) -> int:
    import shlex

    with TemporaryDirectory(prefix="bench-api-") as tmp:
        key, api_port = secrets.token_urlsafe(24), free_port()
        (Path(tmp) / "keys").write_text(key + "\n")
        target = Fenghuo(secrets.token_urlsafe(32), (
            *shlex.split(a.relay), "--api-port", str(api_port),
            "--api-key-file", str(Path(tmp) / "keys")))
        target.start(Path(tmp))
        try:
            assert target.proc is not None
            wait_listening(target.proc, "127.0.0.1", api_port)
            pin(GENERATOR_CPU)
            results = uvloop.run(_run(target, api_port, key, a))
        finally:
            target.stop()
    proto, api = results["protocol"], results["api"]
    print(f"{'path':10} {'publishes/s':>12} {'p50 ms':>8} {'p99 ms':>8}   (one at a time: latency;"
          f" {a.concurrency} in flight: throughput; {a.count} each, {a.payload}-byte payload)")
    for name, r in results.items():
        print(f"{name:10} {r['per_s']:12.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f}")
    print(f"api/protocol: throughput x{api['per_s'] / proto['per_s']:.2f}, "
          f"p50 latency x{api['p50_ms'] / proto['p50_ms']:.2f}, "
          f"p99 latency x{api['p99_ms'] / proto['p99_ms']:.2f}")
    return 0
