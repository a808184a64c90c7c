"""A connection storm from one process: ``python bench/storm.py HOST PORT SOURCE SECRET FIRST COUNT``.

Opens ``COUNT`` raw connections at once from the address ``SOURCE``
(127.0.0.x: each source address has its own ephemeral ports), users
``s<FIRST>`` .. ``s<FIRST+COUNT-1>`` with device ``d``, or with ``--user U``
all of them user ``U`` with devices ``d<FIRST>`` .. ``d<FIRST+COUNT-1>``
(one user's many devices), each sending HELLO.  A connection
refused with ``TRY_AGAIN`` is closed and retried after the wait the refusal
asks for (:func:`fenghuo.protocol.try_again_delay`), as a client must.  Once
every connection is authenticated, one JSON line reports what happened::

    {"admitted": n, "refusals": [[request_id, reason, retry_after_ms, jitter_ms], ...],
     "other": ["description of any other outcome", ...], "first_admitted": t, "done": t}

(``t`` in seconds on this process's monotonic clock from its start).  The
connections then stay open until stdin closes, so the relay can be checked
holding all of them.  Bounded: gives up (reporting what it has) after
``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from fenghuo.core import ErrorCode, FrameReader, FrameType, decode_error

from fenghuo.protocol import encode_json, try_again_delay
from fenghuo.tokens import issue_token

HELLO_ID = 7


class Outcome:
    """What every connection of this storm met."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.admitted = 0
        self.refusals: list[list] = []
        self.other: list[str] = []
        self.first_admitted: float | None = None
        self.open: list[asyncio.StreamWriter] = []

    def report(self) -> str:
        return orjson.dumps({
            "admitted": self.admitted, "refusals": self.refusals, "other": self.other,
            "first_admitted": self.first_admitted,
            "done": time.monotonic() - self.started}).decode()


async def first_frame(reader: asyncio.StreamReader, timeout: float):
    """The first frame the server sends, or None if it closes first."""
    decoder = FrameReader()
    while True:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            return None
        frames = decoder.feed(data)
        if frames:
            return frames[0]


async def admit(host: str, port: int, source: str, user: str, device: str, secret: str,
                outcome: Outcome, timeout: float) -> None:
    """Connect as ``user`` on ``device`` until WELCOME, following every TRY_AGAIN."""
    hello = encode_json(FrameType.HELLO, {"token": issue_token(secret, user), "device": device},
                        HELLO_ID)
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError as exc:
            outcome.other.append(f"{user}: connect failed: {exc!r}")
            await asyncio.sleep(0.5)
            continue
        writer.write(hello)
        try:
            frame = await first_frame(reader, timeout)
        except (TimeoutError, OSError) as exc:
            frame = exc
        if getattr(frame, "type", None) == FrameType.WELCOME:
            outcome.admitted += 1
            if outcome.first_admitted is None:
                outcome.first_admitted = time.monotonic() - outcome.started
            outcome.open.append(writer)
            return
        writer.close()
        if getattr(frame, "type", None) == FrameType.ERROR:
            code, text = decode_error(frame.body)
            if code == ErrorCode.TRY_AGAIN:
                advice = orjson.loads(text)
                outcome.refusals.append([frame.request_id, advice["reason"],
                                         advice["retry_after_ms"], advice["jitter_ms"]])
                await asyncio.sleep(try_again_delay(text))
                continue
            outcome.other.append(f"{user}: error {code} {text}")
        else:
            outcome.other.append(f"{user}: {frame!r} instead of WELCOME or ERROR")
        await asyncio.sleep(0.5)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("host", "port", "source", "secret", "first", "count"):
        parser.add_argument(name)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a first frame")
    parser.add_argument("--user", help="one user for every connection, each its own device")
    a = parser.parse_args()
    outcome = Outcome()
    first, count = int(a.first), int(a.count)
    storm = asyncio.gather(*(
        admit(a.host, int(a.port), a.source, a.user or f"s{i}", f"d{i}" if a.user else "d",
              a.secret, outcome, a.timeout) for i in range(first, first + count)))
    try:
        await asyncio.wait_for(storm, a.deadline)
    except TimeoutError:
        outcome.other.append(f"deadline: {count - outcome.admitted} never admitted")
    print(outcome.report(), flush=True)
    # Hold the connections until told (stdin closes), then leave.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in outcome.open:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
