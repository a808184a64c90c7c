"""The client libraries side by side (``python -m bench ws``, second table).

One relay serving TCP and the WebSocket gateway; the Python client
(``fenghuo.Client``) over TCP and the JavaScript client
(``clients/js/fenghuo.js`` in node, ``bench/js_client.mjs``) over WebSocket,
each doing the same thing as its user would: one sender keeping ``--window``
publishes awaiting their ACK to one receiver, ``--messages`` timed after a
tenth as many to warm up, payloads of 64 bytes of text.  Each client's
figure is the whole path (its own encoding and decoding included), so the
ratio says what a user of one library gets beside the other, not the
transports alone (the first table does that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

import fenghuo
from bench.suite import FENGHUO_VS_PEERS
from bench.targets import Fenghuo
from fenghuo.tokens import issue_token

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = 64


def node_command() -> list[str] | None:
    """node, with the flag that turns WebSocket on where it is still behind one (node 20/21)."""
    node = shutil.which("node")
    if node is None:
        return None
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True)
                .stdout.strip().lstrip("v").split(".")[0])
    return [node, "--experimental-websocket"] if major < 22 else [node]


async def python_run(target: Fenghuo, messages: int, window: int) -> float:
    """Messages/s of the Python client, one sender to one receiver over TCP."""
    url = f"tcp://{target.host}:{target.port}"
    sender = fenghuo.Client(url, token=issue_token(target.secret, "py-a"), device="bench-py-a")
    recipient = fenghuo.Client(url, token=issue_token(target.secret, "py-b"),
                               device="bench-py-b", pending_messages=0)
    received = 0
    wanted, reached = 0, asyncio.Event()

    def on_message(_: fenghuo.Message) -> None:
        nonlocal received
        received += 1
        if received >= wanted:
            reached.set()

    recipient.on_message(on_message)
    await sender.connect()
    await recipient.connect()

    async def send_all(count: int) -> None:
        sent = 0

        async def lane() -> None:
            nonlocal sent
            while sent < count:
                sent += 1
                await sender.send("py-b", "x" * PAYLOAD)
        await asyncio.gather(*(lane() for _ in range(min(window, count))))

    async def until(n: int) -> None:
        nonlocal wanted
        wanted = n
        reached.clear()
        if received < n:
            await asyncio.wait_for(reached.wait(), 120)

    warmup = -(-messages // 10)
    try:
        await send_all(warmup)
        await until(warmup)
        t0 = time.perf_counter()
        await send_all(messages)
        await until(warmup + messages)
        return messages / (time.perf_counter() - t0)
    finally:
        await sender.close()
        await recipient.close()


def js_run(node: list[str], target: Fenghuo, messages: int, window: int) -> float:
    """Messages/s of the JavaScript client in node, one sender to one receiver over WebSocket."""
    url = f"ws://{target.host}:{target.ws_port}/"
    done = subprocess.run([*node, str(ROOT / "bench" / "js_client.mjs"), url,
                           issue_token(target.secret, "js-a"), issue_token(target.secret, "js-b"),
                           "js-b", str(messages), str(window), str(PAYLOAD)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"node failed: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["messages_per_s"])


def compare_clients(a: argparse.Namespace) -> int:
    from bench.__main__ import Progress

    node = node_command()
    progress = Progress(2 * a.repeat)
    best: dict[str, float] = {}
    target = Fenghuo(secrets.token_urlsafe(32), FENGHUO_VS_PEERS, gateway=True)
    with TemporaryDirectory(prefix="bench-clients-") as workdir:
        target.start(Path(workdir))
        try:
            for _ in range(a.repeat):
                progress.step("python client over TCP")
                rate = uvloop.run(python_run(target, a.messages, a.window))
                progress.finish(f"python client over TCP: {rate:,.0f} messages/s")
                best["python"] = max(best.get("python", 0.0), rate)
                progress.step("js client over WebSocket")
                if node is None:
                    progress.finish("js client: node is not installed, skipped")
                    continue
                rate = js_run(node, target, a.messages, a.window)
                progress.finish(f"js client over WebSocket: {rate:,.0f} messages/s")
                best["js"] = max(best.get("js", 0.0), rate)
        finally:
            target.stop()
    js = best.get("js")
    print(f"\n| client | transport | messages/s (one-to-one, window {a.window}) | / Python |")
    print("|---|---|---:|---:|")
    print(f"| Python (fenghuo.Client) | TCP | {best['python']:,.0f} | 1.00 |")
    print("| JavaScript (node, fenghuo.js) | WebSocket | "
          + (f"{js:,.0f} | {js / best['python']:.2f} |" if js else "- | - |"))
    return 0
