"""A trivial echo server: every byte comes back on the link it arrived on.

It does no per-message work at all, so driving it measures the generator's
own ceiling: whatever rate the generator reaches here is the most it can
offer any relay.

With ``--reply LINE`` every read is answered with that fixed line instead:
the uvloop floor of ``python -m bench connect-cost --peers uvloop-floor``,
what a connect costs a uvloop server that does nothing but accept, read once
and write once (its Python: a protocol made, ``connection_made``,
``data_received``, ``connection_lost``).

Run: ``python -m bench.peers.echo --port 7900 [--reply LINE]``
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


class ReplyProtocol(asyncio.Protocol):
    """Every read answered with one fixed line (``--reply``)."""

    reply = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.reply)


async def serve(host: str, port: int, reply: bytes = b"") -> None:
    protocol: type[asyncio.Protocol] = EchoProtocol
    if reply:
        ReplyProtocol.reply = reply
        protocol = ReplyProtocol
    server = await asyncio.get_running_loop().create_server(protocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", default="", metavar="LINE",
                        help="answer every read with LINE (and a newline), not an echo")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.reply.encode() + b"\n" if args.reply else b""))


if __name__ == "__main__":
    main()
