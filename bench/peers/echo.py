"""A trivial echo server: every byte comes back on the link it arrived on.

It does no per-message work at all, so driving it measures the generator's
own ceiling: whatever rate the generator reaches here is the most it can
offer any relay.

Run: ``python -m bench.peers.echo --port 7900``
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(EchoProtocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
