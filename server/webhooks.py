"""The webhook sender: delivers the outbox's rows (server/outbox.py) to their endpoints.

One process sends: the relay under ``--workers 1``, worker 0 under several
(the one that serves the API), reading the rows every worker's writer put in
the shared store.  Per endpoint it holds a window of pending rows in memory,
one queue per stream (channel), and keeps at most one request in flight per
stream, so a channel's events arrive in order; streams go in parallel up to
``--webhook-concurrency``.  What happened is written back through the store's
writer: a delivered row is deleted, a failed one gets its attempt count and
next time, an event past ``--webhook-max-age`` becomes a dead letter.
Delivery is at least once: a sender stopped (or killed) between a 2xx and
that delete sends the row again, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from fenghuo import webhooks
from fenghuo.server import atrest, retention
from fenghuo.server.frames import message_time
from fenghuo.server.outbox import (
    Delivered,
    Endpoint,
    EndpointState,
    Failed,
    Replay,
    message_created,
)

if TYPE_CHECKING:
    from fenghuo.server.config import Settings
    from fenghuo.server.store import SQLiteStore

log = logging.getLogger("fenghuo.webhooks")

# How often the outbox is read again for new rows: writers add them without
# telling the sender, so this is the extra latency of an event.
POLL_INTERVAL = 0.05
# Rows of one endpoint held in memory at most, and read per query.  A window of
# rows lets streams that are not stuck overtake one that is; beyond it a stuck
# stream holds back only its own endpoint.
WINDOW = 10_000
PAGE = 1_000
# Bytes of an answer read at most: the status is all that counts, and a huge
# body must not cost memory or time.
RESPONSE_LIMIT = 64 << 10
# The first retry waits about this long; each next one twice as long, up to --webhook-retry-max.
RETRY_FIRST = 1.0
USER_AGENT = "fenghuo-webhooks/1"
# An outbox row's payload: stored, or (message.created) made from the message
# it names (server/outbox.py), which the same transaction stored.
PAYLOAD = "o.endpoint, o.payload, o.seq, m.frame, m.key_id"
FROM_OUTBOX = ("FROM webhook_outbox o LEFT JOIN messages m"
               " ON o.payload IS NULL AND m.channel = o.stream AND m.seq = o.seq")


@dataclass(slots=True)
class Row:
    """One pending outbox row in memory."""

    id: int
    stream: str
    event_id: str
    type: str
    payload: bytes
    created_us: int
    attempts: int
    next_at: float      # wall-clock seconds
    #: a message.created made from its message: the message's seq and time, which
    #: retention may pass before the event is sent (0 for any other row)
    seq: int = 0
    message_us: int = 0


@dataclass(slots=True)
class Outcome:
    """What one request came to: a status, or an error before any."""

    status: int | None
    error: str = ""
    retry_after: float | None = None


@dataclass
class EndpointStats:
    delivered: int = 0
    failed_attempts: int = 0
    dead: int = 0


@dataclass
class EndpointQueue:
    """What the sender holds for one endpoint."""

    endpoint: Endpoint
    streams: dict[str, deque[Row]] = field(default_factory=dict)
    #: (next attempt, row id, stream) of each stream whose head is not in flight
    due: list[tuple[float, int, str]] = field(default_factory=list)
    loaded: int = 0
    cursor: int = 0             # the highest row id read so far
    filled_at: float = 0.0      # monotonic time of the last read of the outbox
    more: bool = True           # that read was a full page: more rows wait
    in_flight: int = 0
    disabled: str | None = None     # why, when a 410 disabled it
    paused_until: float = 0.0       # a 429's Retry-After
    stats: EndpointStats = field(default_factory=EndpointStats)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, row: Row) -> None:
        queue = self.streams.get(row.stream)
        if queue is None:
            queue = self.streams[row.stream] = deque()
        queue.append(row)
        self.loaded += 1
        self.cursor = max(self.cursor, row.id)
        if len(queue) == 1:
            heapq.heappush(self.due, (row.next_at, row.id, row.stream))

    def done(self, row: Row) -> None:
        """``row`` (its stream's head) is finished with: the stream's next row is due."""
        queue = self.streams[row.stream]
        queue.popleft()
        self.loaded -= 1
        if queue:
            head = queue[0]
            heapq.heappush(self.due, (head.next_at, head.id, head.stream))
        else:
            del self.streams[row.stream]


class WebhookSender:
    def __init__(self, settings: Settings, store: SQLiteStore, endpoints: tuple[Endpoint, ...]) -> None:
        self.settings = settings
        self.store = store
        self.queues = {e.name: EndpointQueue(e) for e in endpoints}
        self.retention = retention.parse_rules(settings.retention)
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()

    def use(self, endpoints: tuple[Endpoint, ...]) -> None:
        """Send to these (the same names: url, secrets, filters read again on SIGHUP) from
        the next request on; one in flight finishes as it began."""
        for endpoint in endpoints:
            self.queues[endpoint.name].endpoint = endpoint

    async def start(self) -> None:
        for name, reason in await self._query("SELECT name, reason FROM webhook_endpoints", ()):
            if name in self.queues:
                self.queues[name].disabled = reason
        # No global limit: each endpoint is bounded by its own concurrency, so a
        # slow endpoint cannot take another's connections.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             headers={"User-Agent": USER_AGENT})
        self._tasks = [asyncio.create_task(self._run(q), name=f"fenghuo-webhook-{q.endpoint.name}")
                       for q in self.queues.values()]
        log.info("webhook sender started", extra={"endpoints": list(self.queues)})

    async def stop(self) -> None:
        for task in [*self._tasks, *self._requests]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._requests, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------ the loop

    async def _run(self, q: EndpointQueue) -> None:
        while True:
            try:
                if q.disabled is None:
                    # Read again once per POLL_INTERVAL, not at every wake-up (every
                    # answered request wakes this loop), unless the last page was full.
                    if q.loaded <= WINDOW - PAGE and (
                            q.more or time.monotonic() - q.filled_at >= POLL_INTERVAL):
                        await self._fill(q)
                    self._start_due(q)
            except asyncio.CancelledError:
                raise
            except Exception:   # a busy store: the next round tries again
                log.exception("webhook sender round failed", extra={"endpoint": q.endpoint.name})
            now = time.time()
            wait = POLL_INTERVAL
            if q.due and q.in_flight < self.settings.webhook_concurrency and q.disabled is None:
                wait = min(wait, max(0.0, max(q.due[0][0], q.paused_until) - now))
            q.wake.clear()
            try:
                await asyncio.wait_for(q.wake.wait(), wait)
            except TimeoutError:
                pass

    async def _fill(self, q: EndpointQueue) -> None:
        rows = await self._query(
            f"SELECT o.id, o.stream, o.event_id, o.type, o.created_us, o.attempts, o.next_us, {PAYLOAD}"
            f" {FROM_OUTBOX} WHERE o.endpoint = ? AND o.dead = 0 AND o.id > ? ORDER BY o.id LIMIT ?",
            (q.endpoint.name, q.cursor, PAGE), with_payload=True)
        q.filled_at, q.more = time.monotonic(), len(rows) == PAGE
        for id_, stream, event_id, type_, created_us, attempts, next_us, payload, seq, message_us in rows:
            q.add(Row(id_, stream, event_id, type_, payload, created_us, attempts, next_us / 1e6,
                      seq, message_us))

    def _start_due(self, q: EndpointQueue) -> None:
        now = time.time()
        if now < q.paused_until:
            return
        while q.due and q.due[0][0] <= now and q.in_flight < self.settings.webhook_concurrency:
            _, row_id, stream = heapq.heappop(q.due)
            head = q.streams[stream][0]
            q.in_flight += 1
            task = asyncio.create_task(self._deliver(q, head))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    def retired(self, channel: str, message_us: int) -> bool:
        """A message of ``channel`` at ``message_us`` is past its retention age: deleted, or
        about to be at retention's next round; its event goes without its content."""
        cutoff = retention.cutoff_us(self.retention, channel, time.time()) if self.retention else None
        return cutoff is not None and message_us < cutoff

    async def _deliver(self, q: EndpointQueue, row: Row) -> None:
        if row.message_us and self.retired(row.stream, row.message_us):
            # Read with its content before retention's age passed; sent (again) after.
            row.payload, row.message_us = message_created(row.stream, row.seq, None), 0
        try:
            outcome = await self._post(q.endpoint, row)
            self._settle(q, row, outcome)
        finally:
            q.in_flight -= 1
            q.wake.set()

    async def _post(self, endpoint: Endpoint, row: Row) -> Outcome:
        assert self.session is not None
        headers = {**webhooks.headers(endpoint.keys, row.event_id, row.payload),
                   "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        try:
            async with self.session.post(endpoint.url, data=row.payload, headers=headers,
                                         allow_redirects=False, timeout=timeout) as response:
                await response.content.read(RESPONSE_LIMIT)
                if not response.content.at_eof():
                    response.close()    # the rest is not read: the connection is not reused
                return Outcome(response.status, "", retry_after(response.headers.get("Retry-After")))
        except TimeoutError:
            return Outcome(None, f"no answer within {self.settings.webhook_timeout:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:500])

    def _settle(self, q: EndpointQueue, row: Row, outcome: Outcome) -> None:
        """Record what a delivery attempt came to; the stream's next row becomes due."""
        status, now = outcome.status, time.time()
        if status is not None and 200 <= status < 300:
            q.stats.delivered += 1
            q.done(row)
            self.store.emit(Delivered((row.id,)))
            return
        if status == 410:
            # Gone: stop sending until re-enabled through the API; the row stays pending.
            q.disabled = f"410 Gone answered to {row.event_id} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}"
            self.store.emit(EndpointState(q.endpoint.name, True, q.disabled))
            heapq.heappush(q.due, (row.next_at, row.id, row.stream))
            log.warning("webhook endpoint disabled", extra={"endpoint": q.endpoint.name})
            return
        q.stats.failed_attempts += 1
        row.attempts += 1
        error = outcome.error or f"HTTP {status}"
        if status == 429 and outcome.retry_after is not None:
            wait = outcome.retry_after
            q.paused_until = max(q.paused_until, now + wait)
        else:
            wait = backoff(row.attempts, self.settings.webhook_retry_max)
        dead = (now + wait) * 1e6 - row.created_us > self.settings.webhook_max_age * 1e6
        row.next_at = now + wait
        self.store.emit(Failed(row.id, row.attempts, int(row.next_at * 1e6), error, dead))
        if dead:
            q.stats.dead += 1
            q.done(row)
        else:
            heapq.heappush(q.due, (row.next_at, row.id, row.stream))

    def metrics(self) -> list[tuple[str, str, str, list[tuple[str, int]]]]:
        """``(name, kind, help, [(endpoint, value)])`` of each family on /metrics."""
        qs = sorted(self.queues.items())
        return [
            ("fenghuo_webhook_delivered_total", "counter", "Webhook events an endpoint answered 2xx.",
             [(n, q.stats.delivered) for n, q in qs]),
            ("fenghuo_webhook_failed_attempts_total", "counter",
             "Webhook attempts that failed (no answer, or not 2xx): retried later.",
             [(n, q.stats.failed_attempts) for n, q in qs]),
            ("fenghuo_webhook_dead_total", "counter",
             "Webhook events given up after --webhook-max-age: dead letters.",
             [(n, q.stats.dead) for n, q in qs]),
            ("fenghuo_webhook_pending", "gauge",
             f"Webhook events read from the outbox and not yet delivered (at most {WINDOW} each).",
             [(n, q.loaded) for n, q in qs]),
            ("fenghuo_webhook_endpoint_disabled", "gauge", "1 while an endpoint is disabled by a 410.",
             [(n, int(q.disabled is not None)) for n, q in qs]),
        ]

    # ------------------------------------------------------------ the API's view

    async def _query(self, sql: str, params: tuple[Any, ...], with_payload: bool = False) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` read on the store's reader thread; ``with_payload``: the last
        five columns (PAYLOAD; the second and third are the stream and the event id)
        become three: the payload to send, made there too (sealed ones opened:
        --store-key-file), and for a message.created made from its message, the
        message's seq and time (else 0, 0).  A message past its retention age
        is not shown, as if retention had already deleted it."""
        store = self.store

        def payload(stream: str, event_id: str, endpoint: str, stored: bytes | None, seq: int,
                    frame: bytes | None, key_id: str | None) -> tuple[bytes, int, int]:
            if stored is not None:
                return atrest.blob_of(store.cipher, stored, atrest.outbox_aad(endpoint, event_id)), 0, 0
            if frame is not None:
                frame = atrest.frame_of(store.cipher, stream, seq, frame, key_id)
                # Decoded twice only where a retention rule may apply.
                message_us = message_time(bytes(frame)) if self.retention else 0
                if not (message_us and self.retired(stream, message_us)):
                    return message_created(stream, seq, frame), seq, message_us
            return message_created(stream, seq, None), 0, 0

        def read() -> list[tuple[Any, ...]]:
            rows = store._reader_conn().execute(sql, params).fetchall()
            if not with_payload:
                return rows
            return [(*r[:-5], *payload(r[1], r[2], *r[-5:])) for r in rows]

        return await asyncio.get_running_loop().run_in_executor(store._reader, read)

    async def describe(self) -> list[dict[str, Any]]:
        counts: dict[tuple[str, int], int] = {
            (name, dead): n for name, dead, n in await self._query(
                "SELECT endpoint, dead, COUNT(*) FROM webhook_outbox GROUP BY endpoint, dead", ())}
        return [{"name": name, "url": q.endpoint.url, "events": sorted(q.endpoint.events),
                 "channels": list(q.endpoint.channels), "disabled": q.disabled is not None,
                 "disabled_reason": q.disabled, "pending": counts.get((name, 0), 0),
                 "dead": counts.get((name, 1), 0), "in_flight": q.in_flight,
                 "delivered": q.stats.delivered, "failed_attempts": q.stats.failed_attempts}
                for name, q in self.queues.items()]

    def enable(self, name: str) -> bool:
        """Send to ``name`` again after a 410; False if it was not disabled."""
        q = self.queues[name]
        if q.disabled is None:
            return False
        q.disabled = None
        self.store.emit(EndpointState(name, False))
        q.wake.set()
        return True

    async def dead_letters(self, name: str, after: int, limit: int) -> list[dict[str, Any]]:
        rows = await self._query(
            f"SELECT o.id, o.stream, o.event_id, o.type, o.attempts, o.last_error, o.created_us, {PAYLOAD}"
            f" {FROM_OUTBOX} WHERE o.endpoint = ? AND o.dead = 1 AND o.id > ? ORDER BY o.id LIMIT ?",
            (name, after, limit), with_payload=True)
        return [{"id": id_, "event_id": event_id, "type": type_, "channel": stream,
                 "attempts": attempts, "last_error": error, "created_us": created_us,
                 "payload": payload.decode()}
                for id_, stream, event_id, type_, attempts, error, created_us, payload, _, _ in rows]

    async def replay(self, name: str, ids: list[int] | None, limit: int) -> int:
        """Dead letters of ``name`` (``ids``, or the oldest ``limit``) sent again, after what is pending."""
        if ids is None:
            found = await self._query("SELECT id FROM webhook_outbox WHERE endpoint = ? AND dead = 1"
                                      " ORDER BY id LIMIT ?", (name, limit))
        else:
            marks = ",".join("?" * len(ids))
            found = await self._query(f"SELECT id FROM webhook_outbox WHERE endpoint = ? AND dead = 1"
                                      f" AND id IN ({marks})", (name, *ids))
        chosen = tuple(r[0] for r in found)
        if chosen:
            self.store.emit(Replay(chosen))
            self.queues[name].wake.set()
        return len(chosen)


def backoff(attempts: int, longest: float) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from RETRY_FIRST, capped, with
    jitter (a uniform draw in the upper half) so endpoints coming back are not hit in step."""
    wait = min(longest, RETRY_FIRST * 2 ** min(attempts - 1, 40))
    return random.uniform(wait / 2, wait)


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
