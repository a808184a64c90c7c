"""Which WebSocket library the gateway stands on: picows, websockets, aiohttp side by side.

Run: ``python -m bench.ws_libs [--messages 200000] [--size 64] [--window 100]``

Each library serves the same echo of binary messages under uvloop in its own
process (pinned to CPU 0); one picows client (pinned to CPU 1) keeps
``--window`` messages in flight and counts echoes per second, and the
round-trip of every message for p50/p99.  A library missing from the
environment is skipped.  The figures are in docs/DESIGN.md,
"WebSocket gateway".
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import uvloop

from bench.targets import free_port, pin, wait_listening

LIBS = ("picows", "websockets", "aiohttp")


async def _serve_picows(port: int) -> None:
    from picows import WSListener, WSMsgType, ws_create_server

    class Echo(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
            if frame.msg_type == WSMsgType.BINARY:
                transport.send(WSMsgType.BINARY, frame.get_payload_as_bytes())

    server = await ws_create_server(lambda _request: Echo(), "127.0.0.1", port)
    await server.serve_forever()


async def _serve_websockets(port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", port, compression=None) as server:
        await server.serve_forever()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import WSMsgType, web

    async def echo(request):  # type: ignore[no-untyped-def]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def drive(port: int, messages: int, size: int, window: int) -> dict[str, float]:
    from picows import WSListener, WSMsgType, ws_connect

    payload = b"x" * size
    sent_at: list[float] = []
    rtts: list[float] = []
    done = asyncio.get_running_loop().create_future()

    class Client(WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport) -> None:  # type: ignore[no-untyped-def]
            self.transport = transport

        def send_one(self) -> None:
            sent_at.append(time.perf_counter())
            self.transport.send(WSMsgType.BINARY, payload)

        def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
            if frame.msg_type != WSMsgType.BINARY:
                return
            rtts.append(time.perf_counter() - sent_at[len(rtts)])
            if len(sent_at) < messages:
                self.send_one()
            elif len(rtts) == messages and not done.done():
                done.set_result(None)

    transport, client = await ws_connect(Client, f"ws://127.0.0.1:{port}/")
    assert isinstance(client, Client)
    start = time.perf_counter()
    for _ in range(min(window, messages)):
        client.send_one()
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - start
    transport.disconnect()
    rtts.sort()
    return {"msgs_per_s": messages / elapsed, "p50_ms": rtts[len(rtts) // 2] * 1e3,
            "p99_ms": rtts[int(len(rtts) * 0.99)] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--serve", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        pin(0)
        uvloop.run(globals()[f"_serve_{args.serve}"](args.port))
        return
    pin(1)
    print(f"echo of {args.messages} binary messages of {args.size} B, {args.window} in flight")
    print(f"{'library':<12}{'msgs/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    for lib in LIBS:
        try:
            __import__(lib)
        except ImportError:
            print(f"{lib:<12}{'(not installed)':>12}")
            continue
        port = free_port("127.0.0.1")
        proc = subprocess.Popen([sys.executable, "-m", "bench.ws_libs", "--serve", lib,
                                 "--port", str(port)])
        try:
            wait_listening(proc, "127.0.0.1", port)
            r = uvloop.run(drive(port, args.messages, args.size, args.window))
        finally:
            proc.terminate()
            proc.wait()
        print(f"{lib:<12}{r['msgs_per_s']:>12,.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
