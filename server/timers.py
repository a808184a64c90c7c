"""Durable timers of the server API: scheduled messages (``send_at``).

Owned by the process that serves the API (the relay under ``--workers 1``,
worker 0 of several, with or without ``--api-port``): scheduling is an API
call or a client's SCHEDULE (server/scheduling.py, through the API's same
path; other workers forward it here), and a fire is a publish
through the API's own session (server/api.py), forwarded to the channel's
owning worker like any other, so it is sequenced (seq and ``ts_us``) when it
fires.  One owner: no two workers can fire the same timer.

Rows live in the store's file (table ``timers``, server/store.py), written
through this module's own connection on one thread, so the event loop never
waits for a commit.  Under ``--store-key-file`` a row's body is sealed like a
stored message (server/atrest.py): a scheduled message's text is never in
the file in clear, and it was masked when the API accepted it.  In memory the owner keeps only ``(due, id)`` per
pending timer in a heap; a timer's body is read when it fires.  Under
``--store memory`` the table is an in-memory SQLite database: timers are
kept while the process lives, and lost with it, like the messages.

Exactly once, even if the relay dies as it fires: the fire publishes under an
idempotency key derived from the timer (the caller's own key, else
``fenghuo-sched-<id>``), and deletes the row only once the message is in the
store.  Before publishing, a timer whose key is already in the store's
messages (a fire the relay died in the middle of) is only deleted.  So a row
outlives its message by at most one restart, and a message never has two.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fenghuo.server import atrest
from fenghuo.server.outbox import WebhookEvent
from fenghuo.server.store import SCHEMA, SQLiteStore, keys_since

log = logging.getLogger("fenghuo.timers")

SEND = "send"
ESCALATE = "escalate"
#: the idempotency key of a scheduled message published without one
SCHEDULE_KEY_PREFIX = "fenghuo-sched-"
# Timers taken out of the heap per fire batch: one read and one delete
# transaction each, whatever the number of timers due at once.
FIRE_BATCH = 1000
# How long a fire under --fsync batch|off waits for its message to reach the
# store before leaving the row to the next start (which finds the message).
CONFIRM_PATIENCE = 5.0
# Cancelled timers the heap may hold (beyond twice the pending ones) before it is rebuilt.
COMPACT_SLACK = 1024
# A fire that failed (the relay's session lost, a busy store) is tried again after this.
RETRY_US = 1_000_000


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class NewTimer:
    due_us: int
    kind: str
    body: bytes
    #: a retried request with the same unique key gets the same timer
    unique_key: str | None = None


@dataclass(frozen=True, slots=True)
class Timer:
    id: int
    due_us: int
    kind: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Added:
    id: int
    duplicate: bool


@dataclass
class Outcome:
    """What firing a batch of timers came to, written in one store transaction."""

    done: list[int] = field(default_factory=list)
    #: ``(channel, seq, user, step)`` of each escalation fired
    escalated: list[tuple[str, int, str, int]] = field(default_factory=list)
    events: list[WebhookEvent] = field(default_factory=list)


class TimerTable:
    """The ``timers`` table, on one connection used by one thread."""

    def __init__(self, store: SQLiteStore | None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fenghuo-timers")
        self.store = store
        if store is not None:
            self._conn = store.connect()
        else:
            self._conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._conn.executescript(SCHEMA)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def add(self, timers: list[NewTimer]) -> Awaitable[list[Added]]:
        return self._run(self._add, timers)

    def _add(self, timers: list[NewTimer]) -> list[Added]:
        out = []
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for t in timers:
                if t.unique_key is not None:
                    row = conn.execute("SELECT id FROM timers WHERE unique_key = ?",
                                       (t.unique_key,)).fetchone()
                    if row is not None:
                        out.append(Added(row[0], True))
                        continue
                cur = conn.execute("INSERT INTO timers (due_us, kind, unique_key, body)"
                                   " VALUES (?, ?, ?, ?)", (t.due_us, t.kind, t.unique_key,
                                                            self._seal(t.kind, t.body)))
                assert cur.lastrowid is not None
                out.append(Added(cur.lastrowid, False))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def pending(self) -> Awaitable[list[tuple[int, int]]]:
        """Every ``(due_us, id)``."""
        return self._run(lambda: self._conn.execute("SELECT due_us, id FROM timers").fetchall())

    def get(self, ids: list[int]) -> Awaitable[list[Timer]]:
        return self._run(self._get, ids)

    def _get(self, ids: list[int]) -> list[Timer]:
        marks = ",".join("?" * len(ids))
        rows = self._conn.execute(f"SELECT id, due_us, kind, body FROM timers WHERE id IN ({marks})",
                                  ids).fetchall()
        return [self._timer(*row) for row in rows]

    def _seal(self, kind: str, body: bytes) -> bytes:
        cipher = self.store.cipher if self.store is not None else None
        return body if cipher is None else cipher.seal_blob(body, atrest.timer_aad(kind))

    def _timer(self, timer_id: int, due_us: int, kind: str, body: bytes) -> Timer:
        """A row as a Timer, its body opened if it is sealed."""
        cipher = self.store.cipher if self.store is not None else None
        return Timer(timer_id, due_us, kind, atrest.blob_of(cipher, body, atrest.timer_aad(kind)))

    def stored(self, keys: list[tuple[str, bytes]], since_us: int
               ) -> Awaitable[dict[tuple[str, bytes], tuple[int, int]]]:
        """``(seq, ts_us)`` of those ``(channel, dedupe)`` in the store's messages
        sequenced from ``since_us`` on (dedupe: sender NUL key)."""
        return self._run(self._stored, keys, since_us)

    def _stored(self, keys: list[tuple[str, bytes]],
                since_us: int) -> dict[tuple[str, bytes], tuple[int, int]]:
        # No index of keys (store schema 3): each channel's messages since
        # the earliest due time, read backwards once.
        wanted: dict[str, set[bytes]] = {}
        for channel, dedupe in keys:
            wanted.setdefault(channel, set()).add(dedupe)
        found = {}
        for channel, dedupes in wanted.items():
            for key, seq, ts_us in keys_since(self._conn, channel, since_us):
                if key in dedupes:
                    found[channel, key] = (seq, ts_us)
        return found

    def escalated(self, channel: str, seq: int) -> Awaitable[dict[str, tuple[int, ...]]]:
        """user -> the steps an escalation fired for, of message ``seq`` of ``channel``."""
        return self._run(self._escalated, channel, seq)

    def _escalated(self, channel: str, seq: int) -> dict[str, tuple[int, ...]]:
        return escalated(self._conn, channel, seq).get(seq, {})

    async def finish(self, outcome: Outcome) -> None:
        """Delete the fired timers, file the escalations: through the store's writer, in one
        transaction with the webhook events; in memory (no webhooks) on this connection."""
        if self.store is not None:
            self.store.timers_done(outcome.done, outcome.escalated)
            for event in outcome.events:
                self.store.emit(event)
            return
        await self.delete(outcome.done)
        await self._run(lambda: self._conn.executemany(
            "INSERT OR IGNORE INTO escalations (channel, seq, user, step) VALUES (?, ?, ?, ?)",
            outcome.escalated))

    def delete(self, ids: Iterable[int], kind: str | None = None) -> Awaitable[int]:
        """Delete the timers ``ids`` (only of ``kind`` if given); how many were there."""
        return self._run(self._delete, list(ids), kind)

    def _delete(self, ids: list[int], kind: str | None) -> int:
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        query = f"DELETE FROM timers WHERE id IN ({marks})"
        params: list[int | str] = [*ids]
        if kind is not None:
            query += " AND kind = ?"
            params.append(kind)
        return self._conn.execute(query, params).rowcount

    def listed(self, kind: str, after: int, limit: int) -> Awaitable[list[Timer]]:
        return self._run(lambda: [self._timer(*row) for row in self._conn.execute(
            "SELECT id, due_us, kind, body FROM timers WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
            (kind, after, limit))])

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._conn.close()


@dataclass
class TimerStats:
    fired: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    #: fires skipped because their message was already in the store (a fire a crash cut short)
    recovered: int = 0


#: what a fire does with a batch of due timers of one kind: notes in the outcome what is done
Firer = Callable[[list[Timer], Outcome], Awaitable[None]]


class Timers:
    """The heap of pending timers and the task that fires them on time."""

    def __init__(self, table: TimerTable, firers: dict[str, Firer]) -> None:
        self.table = table
        self.firers = firers
        self.stats = TimerStats()
        self._heap: list[tuple[int, int]] = []
        #: id -> due_us of every pending timer (cancelled ones leave the heap lazily)
        self.pending: dict[int, int] = {}
        #: timers being fired: too late to cancel
        self.firing: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fires: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for due, timer_id in await self.table.pending():
            self._push(timer_id, due)
        self._task = asyncio.create_task(self._run(), name="fenghuo-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._fires:
            await asyncio.wait(self._fires, timeout=5)
        await asyncio.get_running_loop().run_in_executor(None, self.table.close)

    async def add(self, timers: list[NewTimer]) -> list[Added]:
        added = await self.table.add(timers)
        for t, a in zip(timers, added, strict=True):
            if not a.duplicate:
                self._push(a.id, t.due_us)
        return added

    def _push(self, timer_id: int, due_us: int) -> None:
        self.pending[timer_id] = due_us
        if not self._heap or due_us < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (due_us, timer_id))

    def waiting(self, timer_id: int) -> bool:
        """Whether timer ``timer_id`` is still to fire: not fired, not firing, not cancelled.
        Its row outlives its fire until the message is stored and the row's delete
        committed (the store's writer): the row alone does not tell."""
        return timer_id in self.pending and timer_id not in self.firing

    async def cancel(self, timer_id: int, kind: str) -> bool | None:
        """True if cancelled, False if no such pending timer, None if it is firing."""
        if timer_id in self.firing:
            return None
        due_us = self.pending.pop(timer_id, None)
        if due_us is None:
            # Fired (its row's delete maybe not yet committed), cancelled, or never made.
            return False
        # Out of pending before the delete is awaited: it cannot start firing meanwhile.
        try:
            deleted = await self.table.delete([timer_id], kind)
        except BaseException:
            self._push(timer_id, due_us)            # not cancelled: still to fire
            raise
        if not deleted:
            self._push(timer_id, due_us)            # of another kind: left as it was
            return False
        if len(self._heap) > 2 * len(self.pending) + COMPACT_SLACK:
            # Cancelled entries leave the heap only when due: rebuilt, it holds the pending ones.
            self._heap = [(due, i) for i, due in self.pending.items()]
            heapq.heapify(self._heap)
        return True

    async def _run(self) -> None:
        while True:
            now = now_us()
            due: list[int] = []
            while self._heap and self._heap[0][0] <= now and len(due) < FIRE_BATCH:
                _, timer_id = heapq.heappop(self._heap)
                if self.pending.pop(timer_id, None) is not None:
                    due.append(timer_id)
            if due:
                self.firing.update(due)
                task = asyncio.create_task(self._fire(due))
                self._fires.add(task)
                task.add_done_callback(self._fires.discard)
                continue
            self._wake.clear()
            delay = (self._heap[0][0] - now) / 1e6 if self._heap else None
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _fire(self, ids: list[int]) -> None:
        try:
            timers = await self.table.get(ids)
            by_kind: dict[str, list[Timer]] = {}
            for t in timers:
                by_kind.setdefault(t.kind, []).append(t)
            outcome = Outcome()
            for kind, batch in by_kind.items():
                await self.firers[kind](batch, outcome)
                self.stats.fired[kind] = self.stats.fired.get(kind, 0) + len(batch)
            await self.table.finish(outcome)
        except Exception:
            # Tried again in a second; a timer whose message was sent is then only deleted.
            # Still firing meanwhile (some may have been sent): not listed, not cancelled.
            log.exception("firing timers failed", extra={"timers": len(ids)})
            for timer_id in ids:
                self._push(timer_id, now_us() + RETRY_US)
            return
        self.firing.difference_update(ids)


def escalated(conn: sqlite3.Connection, channel: str,
              seq: int | None = None) -> dict[int, dict[str, tuple[int, ...]]]:
    """seq -> user -> the steps an escalation fired for, of message ``seq`` of
    ``channel`` (None: of all its messages)."""
    query = "SELECT seq, user, step FROM escalations WHERE channel = ?"
    params: tuple[str | int, ...] = (channel,)
    if seq is not None:
        query, params = query + " AND seq = ?", (channel, seq)
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for at, user, step in conn.execute(query + " ORDER BY seq, step", params):
        users = out.setdefault(at, {})
        users[user] = (*users.get(user, ()), step)
    return out
