"""Bad requests pipelined with good ones, while a canary pair chats.

    python -m bench hostile --workers 2 --seconds 10

Starts a relay (``--workers W``, the default store) and opens
``--connections`` hostile connections.  Each sends batches of ``--batch``
requests in one write: malformed bodies (not JSON, not an object),
wrong-typed fields, JSON nested 400 levels deep (orjson decodes 1,024 and
encodes 255: a body another worker would have to re-encode), unknown ops and
an unknown frame type, mixed at random (seeded) with valid PING, PUBLISH,
HISTORY, GROUP list and PRESENCE query, and a PING last.  Every request has
a request id and gets exactly one reply, none of them fatal.  Meanwhile a
canary (``alice`` to ``bob``, 100 messages/s) chats on its own connections.

Reported: replies per second over the hostile connections; wedged
connections (the batch's last PING unanswered after ``--wedge-after``
seconds; the connection is then replaced); replies out of request order
(request ids are increasing per connection); requests never answered; canary
messages acknowledged but not delivered to bob.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import uvloop

from bench.targets import Fenghuo
from fenghuo.core import FrameReader, FrameType, decode_ack, decode_error, decode_message
from fenghuo.protocol import encode_frame, encode_json, encode_publish

CANARY_RATE = 100.0          # canary messages per second
NEST = 400                   # levels of the deeply nested bodies

Build = Callable[[random.Random, int, str], bytes]


def _nested(leaf: bytes) -> bytes:
    return b"[" * NEST + leaf + b"]" * NEST


# Each builder returns one request frame with request id ``rid`` from user ``me``.
BAD: dict[str, Build] = {
    "not-json": lambda r, rid, me: encode_frame(FrameType.GROUP, b"{not json", rid),
    "not-an-object": lambda r, rid, me: encode_frame(FrameType.HISTORY, b"[1, 2]", rid),
    "history-limit-string": lambda r, rid, me: encode_json(
        FrameType.HISTORY, {"channel": f"dm:{me}:{me}x", "limit": "ten"}, rid),
    "group-id-number": lambda r, rid, me: encode_json(FrameType.GROUP, {"op": "add", "group": 5}, rid),
    "presence-users-string": lambda r, rid, me: encode_json(
        FrameType.PRESENCE, {"op": "query", "users": "bob"}, rid),
    "nested-group-users": lambda r, rid, me: encode_frame(
        FrameType.GROUP, b'{"op":"add","group":"g%d","users":' % r.randrange(64)
        + _nested(b'"bob"') + b"}", rid),
    "nested-history-channel": lambda r, rid, me: encode_frame(
        FrameType.HISTORY, b'{"channel":' + _nested(b'"x"') + b"}", rid),
    "unknown-group-op": lambda r, rid, me: encode_json(
        FrameType.GROUP, {"op": "frobnicate", "group": f"g{r.randrange(64)}"}, rid),
    "unknown-cursor-op": lambda r, rid, me: encode_json(FrameType.CURSOR, {"op": "rewind"}, rid),
    "unknown-frame-type": lambda r, rid, me: encode_frame(0x7E, b"", rid),
}
GOOD: dict[str, Build] = {
    "ping": lambda r, rid, me: encode_frame(FrameType.PING, b"", rid),
    "publish": lambda r, rid, me: encode_publish(f"dm:{me}:{me}x", b"hostile", request_id=rid),
    "history": lambda r, rid, me: encode_json(
        FrameType.HISTORY, {"channel": f"dm:{me}:{me}x", "limit": 5}, rid),
    "group-list": lambda r, rid, me: encode_json(FrameType.GROUP, {"op": "list"}, rid),
    "presence-query": lambda r, rid, me: encode_json(
        FrameType.PRESENCE, {"op": "query", "users": ["bob"]}, rid),
}
REPLIES = {FrameType.PONG, FrameType.ACK, FrameType.RESULT, FrameType.HISTORY_PAGE,
           FrameType.ERROR}


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    out_of_order: int = 0
    wedged: int = 0
    unanswered: int = 0
    errors: dict[int, int] = field(default_factory=dict)


async def hostile(relay: Fenghuo, index: int, batch: int, wedge_after: float,
                  until: float, tally: Tally) -> None:
    """One hostile client: batches in one write each, a fresh connection after a wedge."""
    rng = random.Random(index)
    while time.monotonic() < until:
        if await _one_connection(relay, f"h{index}", rng, batch, wedge_after, until, tally):
            tally.wedged += 1


async def _one_connection(relay: Fenghuo, me: str, rng: random.Random, batch: int,
                          wedge_after: float, until: float, tally: Tally) -> bool:
    """Send batches on one connection until ``until``; True if it wedged."""
    builders = [*BAD.values(), *GOOD.values()]
    link = await relay.open(me)
    reader, writer = link.reader, link.writer
    frames, rid, last, expected = FrameReader(), 1, 1, 0
    try:
        while time.monotonic() < until:
            out = [rng.choice(builders)(rng, rid + k, me) for k in range(1, batch)]
            rid += batch
            out.append(GOOD["ping"](rng, rid, me))
            writer.write(b"".join(out))
            tally.sent += batch
            expected += batch
            deadline = time.monotonic() + wedge_after
            done = False
            while not done:
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 16),
                                                   max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    return True
                if not chunk:
                    raise ConnectionError(f"{me}: the relay closed the connection")
                for frame in frames.feed(chunk):
                    if frame.type not in REPLIES:
                        continue                # MESSAGE: its own publishes
                    tally.answered += 1
                    expected -= 1
                    if frame.type == FrameType.ERROR:
                        code = decode_error(frame.body)[0]
                        tally.errors[code] = tally.errors.get(code, 0) + 1
                    if frame.request_id < last:
                        tally.out_of_order += 1
                    last = max(last, frame.request_id)
                    done = done or frame.request_id == rid
        return False
    finally:
        writer.close()
        tally.unanswered += expected


async def canary(relay: Fenghuo, until: float) -> dict[str, int]:
    """alice sends bob CANARY_RATE messages/s; what was acked and what bob got."""
    alice_link, bob_link = await relay.open("canary-a"), await relay.open("canary-b")
    alice_reader, alice = alice_link.reader, alice_link.writer
    bob_reader, bob = bob_link.reader, bob_link.writer
    acked: set[bytes] = set()
    received: set[bytes] = set()

    async def read_acks() -> None:
        frames = FrameReader()
        while chunk := await alice_reader.read(1 << 16):
            for frame in frames.feed(chunk):
                if frame.type == FrameType.ACK:
                    decode_ack(frame.body)
                    acked.add(b"c%d" % frame.request_id)

    async def read_bob() -> None:
        frames = FrameReader()
        while chunk := await bob_reader.read(1 << 16):
            for frame in frames.feed(chunk):
                if frame.type == FrameType.MESSAGE:
                    received.add(decode_message(frame.body).payload)

    readers = [asyncio.create_task(read_acks()), asyncio.create_task(read_bob())]
    sent = 0
    while time.monotonic() < until:
        sent += 1
        alice.write(encode_publish("dm:canary-a:canary-b", b"c%d" % sent, request_id=sent))
        await asyncio.sleep(1 / CANARY_RATE)
    await asyncio.sleep(2.0)               # the last ones reach bob
    for task in readers:
        task.cancel()
    alice.close()
    bob.close()
    return {"sent": sent, "acked": len(acked), "received": len(received & acked),
            "lost": len(acked - received)}


async def run(relay: Fenghuo, connections: int, batch: int, seconds: float,
              wedge_after: float) -> dict[str, Any]:
    tally = Tally()
    started = time.monotonic()
    until = started + seconds
    canary_task = asyncio.create_task(canary(relay, until))
    await asyncio.gather(*(hostile(relay, k, batch, wedge_after, until, tally)
                           for k in range(connections)))
    elapsed = time.monotonic() - started
    chat = await canary_task
    return {"workers": relay.workers, "seconds": round(elapsed, 1), "connections": connections,
            "sent": tally.sent, "answered": tally.answered,
            "answered_per_s": round(tally.answered / elapsed),
            "wedged": tally.wedged, "out_of_order": tally.out_of_order,
            "unanswered": tally.unanswered, "canary": chat,
            "canary_lost": chat["lost"],
            "errors": {str(k): v for k, v in sorted(tally.errors.items())}}


def cmd_hostile(a: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as workdir:
        relay = Fenghuo(secrets.token_urlsafe(32), tuple(a.relay.split()), a.workers)
        relay.start(Path(workdir))
        try:
            result = uvloop.run(run(relay, a.connections, a.batch, a.seconds, a.wedge_after))
        finally:
            relay.stop()
    print(f"hostile --workers {a.workers}: {result['answered_per_s']:,} replies/s, "
          f"{result['wedged']} wedged, {result['out_of_order']} out of order, "
          f"{result['unanswered']} unanswered, canary {result['canary']['lost']} lost "
          f"of {result['canary']['acked']} acked")
    print(json.dumps(result), flush=True)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hostile", help="bad requests pipelined with good ones, a canary chatting "
                                       "(see bench/hostile.py)")
    p.add_argument("--workers", type=int, default=1, help="relay workers (default 1)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=8, help="hostile connections")
    p.add_argument("--batch", type=int, default=32, help="requests per write, a PING last")
    p.add_argument("--wedge-after", type=float, default=3.0,
                   help="seconds without the batch's last PONG before a connection counts as wedged")
    p.add_argument("--relay", default="", metavar="FLAGS", help="extra `fenghuo serve` flags")
    p.set_defaults(func=cmd_hostile)
