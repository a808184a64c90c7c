"""``python -m bench webhooks``: webhook events per second out of the outbox, and the outbox's
cost to publish throughput.

Two relays in one run (``--workers 1``, pinned like every target, the SQLite
store with the given ``--relay`` flags, default ``--fsync always``): one
without webhooks, one with a webhook endpoint for every event type, whose
receiver (a separate process verifying every signature) answers 204.

1. **Publish cost.** On each relay the same ``--count`` publishes over
   ``--channels`` org channels, ``--concurrency`` in flight, one client (the
   generator, pinned to the other CPU): publishes/s and one-at-a-time
   latency, and their ratio with/without webhooks, the best of ``--repeat``
   runs alternating between the relays (the machine is shared: one run is noisy).  "with webhooks": the
   sender delivers while the publishes run, on the relay's one CPU, so the
   ratio includes its HTTP work; "outbox writes only": the same publishes
   while the endpoint is disabled (phase 2), the outbox's own cost.
2. **Outbox drain.** The receiver answers 410 to the first request, which
   disables the endpoint; ``--count`` messages are published, their events
   wait in the outbox; the receiver then answers 204 and ``webhook_enable``
   (server API) starts the sender: events/s from that call until the
   receiver has verified the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp
import uvloop
from aiohttp import web

from bench.api import _measure
from bench.options import add_publish_options
from bench.targets import GENERATOR_CPU, Fenghuo, free_port, pin, wait_listening


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhooks", help="webhook events/s out of the outbox and the outbox's cost "
                                        "to publish throughput (bench/webhooks.py)")
    add_publish_options(p, count=10000)
    p.add_argument("--channels", type=int, default=64, help="org channels the publishes go to")
    p.add_argument("--repeat", type=int, default=3, help="alternating runs; the best of each is shown")
    p.add_argument("--relay", default="", metavar="FLAGS",
                   help="extra `fenghuo serve` flags for both relays (e.g. '--fsync batch')")
    p.set_defaults(func=cmd_webhooks)


# ---------------------------------------------------------------- the receiver process


def receive(port: int, secret: str) -> None:
    """Verify and count events; ``POST /status/N`` sets the status answered from then on
    (410 answers once, then 204 until told otherwise); ``GET /count`` says how many verified."""
    from fenghuo.webhooks import verify

    state = {"count": 0, "status": 204}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        status = state["status"]
        if status == 410:
            state["status"] = 204
            return web.Response(status=410)
        verify(secret, request.headers, body)
        state["count"] += 1
        return web.Response(status=status)

    async def set_status(request: web.Request) -> web.Response:
        state["status"] = int(request.match_info["status"])
        return web.Response(status=204)

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(state["count"]))

    app = web.Application()
    app.router.add_post("/hooks", hook)
    app.router.add_post("/status/{status}", set_status)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Receiver:
    def __init__(self, workdir: Path) -> None:
        from fenghuo.webhooks import new_secret

        self.port, self.secret = free_port(), new_secret()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.webhooks", "receive",
                                      str(self.port), self.secret], cwd=Path(__file__).parent.parent)
        wait_listening(self.proc, "127.0.0.1", self.port)
        self.hooks = workdir / "hooks.toml"
        self.hooks.write_text(f'[[endpoint]]\nname = "bench"\nurl = "http://127.0.0.1:{self.port}/hooks"\n'
                              f'secrets = ["{self.secret}"]\n')

    async def call(self, http: aiohttp.ClientSession, method: str, path: str) -> str:
        async with http.request(method, f"http://127.0.0.1:{self.port}{path}") as response:
            return await response.text()

    async def wait_count(self, http: aiohttp.ClientSession, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while int(await self.call(http, "GET", "/count")) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the receiver did not get {count} events in {timeout:g} s")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---------------------------------------------------------------- the measurements


async def _publishes(target: Fenghuo, a: argparse.Namespace, user: str) -> dict[str, float]:
    import fenghuo

    channels = [f"org.bench.c{i}" for i in range(a.channels)]
    payload = "x" * a.payload
    client = fenghuo.Client(f"tcp://127.0.0.1:{target.port}", user=user, secret=target.secret,
                            channels=("org.bench.>",), reconnect=False)
    await client.connect()
    try:
        return await _measure(lambda i: client.publish(channels[i % len(channels)], payload),
                              a.count, a.concurrency)
    finally:
        await client.close()


async def _settled(api, disabled: bool | None = None, timeout: float = 600) -> dict:
    """The endpoint's state once nothing is pending (or, with ``disabled``, once it is disabled)."""
    deadline = time.monotonic() + timeout
    while True:
        (state,) = (await api.webhook_endpoints())["endpoints"]
        if (state["disabled"] if disabled else state["pending"] == 0):
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"the endpoint did not settle: {state}")
        await asyncio.sleep(0.05)


async def _rounds(plain: Fenghuo, hooked: Fenghuo, receiver: Receiver, api_port: int, key: str,
                  a: argparse.Namespace) -> tuple[dict[str, list[dict[str, float]]], dict[str, float]]:
    """Alternating measurements (both relays share one CPU: each waits while the other runs)."""
    from fenghuo.api import AsyncApi

    runs: dict[str, list[dict[str, float]]] = {
        "without webhooks": [], "with webhooks": [], "outbox writes only": []}
    async with aiohttp.ClientSession() as http, AsyncApi(f"http://127.0.0.1:{api_port}", key) as api:
        for _ in range(a.repeat):
            runs["without webhooks"].append(await _publishes(plain, a, "bench-pub"))
            runs["with webhooks"].append(await _publishes(hooked, a, "bench-pub"))
            await _settled(api)     # its sender must not run during the next measurement
        await receiver.call(http, "POST", "/status/410")
        await _publishes(hooked, a, "bench-pub")    # its first event disables the endpoint
        await _settled(api, disabled=True)
        for _ in range(a.repeat):
            runs["without webhooks"].append(await _publishes(plain, a, "bench-pub"))
            runs["outbox writes only"].append(await _publishes(hooked, a, "bench-pub"))
        before = int(await receiver.call(http, "GET", "/count"))
        pending = (await api.webhook_endpoints())["endpoints"][0]["pending"]
        started = time.perf_counter()
        await api.webhook_enable("bench")
        await receiver.wait_count(http, before + pending)
        elapsed = time.perf_counter() - started
    return runs, {"events": pending, "seconds": elapsed, "per_s": pending / elapsed}


def _relay(workdir: Path, flags: tuple[str, ...]) -> Fenghuo:
    target = Fenghuo(secrets.token_urlsafe(32), flags)
    workdir.mkdir()
    target.start(workdir)
    return target


def cmd_webhooks(a: argparse.Namespace) -> int:
    extra = tuple(shlex.split(a.relay))
    with TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        root = Path(tmp)
        receiver = Receiver(root)
        key, api_port = secrets.token_urlsafe(24), free_port()
        (root / "keys").write_text(key + "\n")
        started: list[Fenghuo] = []
        try:
            pin(GENERATOR_CPU)
            started.append(_relay(root / "plain", extra))
            started.append(_relay(root / "hooked", (
                *extra, "--webhooks", str(receiver.hooks), "--api-port", str(api_port),
                "--api-key-file", str(root / "keys"))))
            assert started[1].proc is not None
            wait_listening(started[1].proc, "127.0.0.1", api_port)
            runs, drain = uvloop.run(_rounds(started[0], started[1], receiver, api_port, key, a))
        finally:
            for target in started:
                target.stop()
            receiver.stop()
    best = {name: max(r, key=lambda m: m["per_s"]) for name, r in runs.items()}
    print(f"{'relay':18} {'publishes/s':>12} {'p50 ms':>8} {'p99 ms':>8}   (best of {len(runs['with webhooks'])}"
          f" alternating runs; {a.count} publishes over {a.channels} channels, {a.concurrency} in flight;"
          f" latency one at a time; relay flags: {a.relay or 'defaults'})")
    for name, r in best.items():
        print(f"{name:18} {r['per_s']:12.0f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f}")
    without = best["without webhooks"]
    for name in ("with webhooks", "outbox writes only"):
        r = best[name]
        print(f"{name}/without: throughput x{r['per_s'] / without['per_s']:.2f}, "
              f"p50 latency x{r['p50_ms'] / without['p50_ms']:.2f}")
    print(f"outbox drain: {drain['events']:.0f} events in {drain['seconds']:.2f} s = "
          f"{drain['per_s']:.0f} events/s delivered and verified")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["receive"]:
        receive(int(sys.argv[2]), sys.argv[3])
