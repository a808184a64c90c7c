"""Keeping the stream's and the buckets' leaders on one nats-server (``--stream-leader``).

Every append is a quorum write at the stream's leader, and every claim, group
and cursor write one at its bucket's leader: across regions, where the leader
is sets most of a message's path (docs/DESIGN.md, "Placing the stream").
nats-server 2.9 has no leader preference: JetStream elects any replica, and a
stream's leader moved between runs of ``bench cluster --parts regions``
(Sydney, Virginia, Shanghai).  What it has is a step-down
(``$JS.API.STREAM.LEADER.STEPDOWN.<stream>``), which hands the leadership to
another current replica, not one the caller names (2.9 refuses a request body
naming one: error 10003).  So the node keeping the leaders asks each stream
led elsewhere to step down, looks again, and asks again until it is led by
the named server; it asks only when that server holds a current replica of
the stream (after a restart it first catches up), so a step-down never hands
the stream to a replica that would have to catch up first.

One node does it at a time: the live participant with the lowest index (as
for retention), so two nodes never step a stream down twice over, which
could move it off the named server again.  If the named server is down, or
holds no replica of a stream (``--stream-tags`` left it out), its leader
stays where JetStream put it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import nats.errors
import nats.js.errors

from fenghuo.server.jetstream import UNAVAILABLE, Engine

log = logging.getLogger("fenghuo.stream_leader")

# Seconds between two looks at the leaders when each is where it should be: a
# leader moves only at an election (a server's death, 4-9 s of waiting in
# nats-server 2.9) or a step-down, so a look every few seconds puts it back
# within one election's time; each look is one STREAM.INFO per stream (7).
CHECK_S = 5.0
# Seconds before the next look after a step-down: a stepped-down stream of
# three servers on loopback had its next leader 0.29 s after the request.
AFTER_STEPDOWN_S = 1.0
# What a look may meet and try again after: an election under way (no leader
# answers STREAM.INFO), a reconnect.
PASSING: tuple[type[Exception], ...] = (*UNAVAILABLE, nats.js.errors.APIError, nats.errors.Error)


class LeaderKeeper:
    """Moves the leaders of the cluster's streams to ``server`` while ``chosen()``
    says this participant is the one to (the live one with the lowest index)."""

    def __init__(self, engine: Engine, server: str, chosen: Callable[[], bool]) -> None:
        self.engine = engine
        self.server = server
        self.chosen = chosen
        #: step-downs asked for (each moves one stream's leader elsewhere)
        self.stepdowns = 0
        #: streams led by ``server`` at the last look (of :data:`jetstream.STREAMS`)
        self.led: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        pause = AFTER_STEPDOWN_S
        while True:
            # Up to half again at random: nodes that each think themselves the
            # lowest (a lease not run out yet) do not look in step.
            await asyncio.sleep(pause * (1 + random.random() / 2))
            pause = CHECK_S
            if not self.chosen():
                continue
            try:
                asked, self.led = await self.engine.lead_from(self.server)
            except PASSING as exc:
                log.info("cannot look at the streams' leaders now",
                         extra={"error": f"{type(exc).__name__}: {exc}"})
                pause = AFTER_STEPDOWN_S
                continue
            if asked:
                self.stepdowns += len(asked)
                log.info("asked streams led elsewhere to step down",
                         extra={"streams": asked, "stream_leader": self.server})
                pause = AFTER_STEPDOWN_S
