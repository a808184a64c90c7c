"""The baseline peer: fenghuo's wire protocol in plain Python on asyncio.

The obvious way, in a few dozen lines: ``struct`` framing, one ``write`` per
frame per recipient, no coalescing, no ring, no store, no flood control.  It
speaks enough of protocol v1 for ``bench/loadgen.py`` (HELLO, GROUP create,
PUBLISH to ``dm:`` and ``group:`` channels), so the same generator measures
both and the results are a ratio.

Run: ``python -m bench.peers.asyncio_relay --port 7800 --secret S``
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time

import jwt
import orjson
import uvloop

HEADER = struct.Struct(">IBBHI")
PUBLISH = struct.Struct(">BBBH")
MESSAGE = struct.Struct(">QQBBBBH")
ACK = struct.Struct(">QQBB")
HELLO, GROUP, PUBLISH_T, WELCOME, RESULT, MESSAGE_T, ACK_T = 0x01, 0x20, 0x10, 0x81, 0x82, 0x90, 0x91

users: dict[str, set[Relay]] = {}
groups: dict[str, list[str]] = {}
seqs: dict[str, int] = {}


def frame(ftype: int, body: bytes, rid: int = 0) -> bytes:
    return HEADER.pack(8 + len(body), 1, ftype, 0, rid) + body


class Relay(asyncio.Protocol):
    def __init__(self, secret: str) -> None:
        self.secret, self.buf, self.user = secret, bytearray(), ""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        users.get(self.user, set()).discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            length = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < length + 4:
                return
            _, _, ftype, _, rid = HEADER.unpack_from(self.buf)
            body = bytes(self.buf[12:length + 4])
            del self.buf[:length + 4]
            self.handle(ftype, rid, body)

    def handle(self, ftype: int, rid: int, body: bytes) -> None:
        if ftype == HELLO:
            self.user = jwt.decode(orjson.loads(body)["token"], self.secret, algorithms=["HS256"])["sub"]
            users.setdefault(self.user, set()).add(self)
            self.transport.write(frame(WELCOME, orjson.dumps({"user": self.user}), rid))
        elif ftype == GROUP:
            request = orjson.loads(body)
            groups[request["group"]] = [self.user, *request["members"]]
            self.transport.write(frame(RESULT, orjson.dumps({"group": request["group"]}), rid))
        elif ftype == PUBLISH_T:
            ctype, ch_len, key_len, meta_len = PUBLISH.unpack_from(body)
            channel = body[5:5 + ch_len].decode()
            payload = body[5 + ch_len + key_len + meta_len:]
            members = (channel[3:].split(":") if channel.startswith("dm:")
                       else groups[channel.split(":", 1)[1]])
            seq = seqs[channel] = seqs.get(channel, 0) + 1
            ts = time.time_ns() // 1000
            sender = self.user.encode()
            message = frame(MESSAGE_T, MESSAGE.pack(seq, ts, ctype, ch_len, len(sender), 0, 0)
                            + channel.encode() + sender + payload)
            for member in members:
                for conn in users.get(member, ()):
                    conn.transport.write(message)
            self.transport.write(frame(ACK_T, ACK.pack(seq, ts, 0, ch_len) + channel.encode(), rid))


async def main(port: int, secret: str) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Relay(secret), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.secret))
