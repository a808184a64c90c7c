"""Durable storage: SQLite in WAL mode, written by one thread with group commit.

The event loop never waits on a write: :meth:`SQLiteStore.append` puts a typed
record (core/records.pyx) on the writer's queue; the writer thread takes
everything queued and writes it in one transaction through the compiled
writer (core/writer.pyx: SQLite's C API, prepared statements, the GIL released
while SQLite works), commits (one sync per batch under ``fsync=always|batch``)
and hands the batch's records back to the loop with ``call_soon_threadsafe``.
What the hub deferred for that batch (under ``always``: ring, delivery, ack)
is released there, in order.  Messages are inserted by the writer itself;
every other record is written by its entry in ``_WRITES``, matched on type.

Reads that may be large (history pages, catch-up beyond the ring) run on a
reader thread with its own connection; WAL lets it read while the writer
writes.  Reads that are small and needed synchronously (a channel's head and
recent frames when it is first touched) use the loop's own connection.

It implements :class:`fenghuo.server.engines.Store`, the interface the relay uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from fenghuo.core import (
    ClickSave,
    DeliveredCursor,
    DeviceCursors,
    Expiry,
    GroupSave,
    INSERT_SPAN,
    ReadCursor,
    Record,
    Sequenced,
    SQLiteWriter,
    TimersDone,
)
from fenghuo.server import atrest
from fenghuo.server.atrest import FrameCipher
from fenghuo.server.checkpointer import CHECKPOINT_PAGES, Checkpointer
from fenghuo.server.clicks import Click
from fenghuo.server.outbox import (
    OUTBOX_SCHEMA,
    Delivered,
    EndpointState,
    Failed,
    Outbox,
    OutboxRecord,
    Replay,
    WebhookEvent,
)
from fenghuo.server.stalls import Histogram, SchedStat, thread_schedstat

log = logging.getLogger("fenghuo.store")

FSYNC_MODES = ("always", "batch", "off")
DB_FILE = "fenghuo.db"
#: Test hook, unset in service (tests/test_worker_deliveries.py): seconds the writer
#: waits after a batch is on disk before handing it back to the loop, as a loop too
#: busy to take it makes it wait.  Meanwhile the batch's messages are in the file,
#: where another worker reads them, and not yet in their owner's ring.
HANDBACK_DELAY_ENV = "FENGHUO_TEST_HANDBACK_DELAY"
#: Test hook, unset in service (tests/test_epochs.py): seconds the writer waits
#: before writing a batch it took, as a slow disk makes it wait.  Under
#: --fsync batch|off the batch's messages are acked and delivered meanwhile,
#: and a kill -9 loses them.
WRITE_DELAY_ENV = "FENGHUO_TEST_WRITE_DELAY"
#: Test hook, unset in service (tests/test_store_wal.py): WAL frames at which the
#: checkpointer starts (server/checkpointer.py), in place of 65,536 (256 MiB), so
#: that a test's load goes through many checkpoints.
CHECKPOINT_PAGES_ENV = "FENGHUO_TEST_CHECKPOINT_PAGES"
# Records per transaction at most: bounds a batch's latency under a flood.
MAX_BATCH = 8192
# Records queued for the writer beyond which the relay stops reading from
# clients (under fsync=batch|off nothing else holds publishers back), and
# below which it reads again.
BACKLOG_HIGH = 50_000
BACKLOG_LOW = 10_000
# The GIL switch interval (sys.setswitchinterval) of a process whose writer
# acks (--fsync always) and may run on a CPU of its own.  The writer takes the
# GIL back from the loop once or twice a batch (after the commit, and when
# records wake it from an empty queue) and, with the loop busy, waits for it
# the whole interval, Python's 5 ms, each time; under `always` the batch's
# acks wait too.  At 0.5 ms the default deployment's one-to-one p99 at 50,000
# msgs/s under `always` was 21-89 ms (median 29) against 19-540 ms (median
# 41), lower in 8 of 10 alternating rounds at load average 5-8, its
# many-to-many unchanged.  A relay pinned to one CPU did worse with it (p99
# 54-57 against 33-35 ms: its loop and writer cannot run at once, so
# switching sooner only chops the loop's work), so it keeps Python's
# (bench/README.md, "The GIL's switch interval under `always`").
WRITER_SWITCH_INTERVAL = 0.0005

# The messages table (schema 5, PRAGMA user_version).  Rows are appended
# (``id``, the rowid, counts up), so a commit's rows fill the table's last
# pages whichever channels they belong to, a commit's in (channel, seq) order
# (core/writer.pyx sorts the batch: a channel's entries go into its leaf of
# ``messages_by_seq`` one after another); a channel's messages
# are found through ``messages_by_seq``, whose entries are small.  A commit
# thus writes, per channel it touches, one leaf of one index, where schema 1
# (the table clustered by (channel, seq), WITHOUT ROWID, and an index by
# (channel, ts_us)) wrote that channel's leaf of the table and of the index:
# bench/README.md "The durable store's commits".  History by time reads a
# channel by seq and filters on ts_us (as schema 1's query plan did too).
# Schema 3 is schema 2 without
# ``messages_by_key (channel, dedupe)``: a random key wrote a random page of
# it, one WAL page per keyed publish; a channel's window now holds every key
# of its span with its seq (core/dedupe.pyx), so the store is asked for a
# key by seq only (``find_key``), and a restart reloads the span's keys
# (``dedupe_keys``).  The key stays in its row, unindexed.  Schema 4 adds
# ``channel_heads``: the last seq of a channel's rows that retention deleted,
# written by the retention job in the transaction that deletes them (one row a
# channel it touched, never a write per message or per commit); a channel's
# head at load is the greater of its rows' last seq and that row, so a channel
# retention emptied continues its seqs after a restart (PROTOCOL §6.6), and
# a direct chat retention emptied is still one of its participants' channels.
# Schema 5 drops ``messages_by_ts (ts_us)``, an entry per message that was a
# fifth of the writer's CPU a message (bench/README.md "The commit's rows in
# channel order"), for ``commit_spans``: one row a commit, its least and
# greatest id and ts_us (core/writer.pyx writes it after the commit's rows).
# Every row lies in the ids of a span whose times include its ts_us, so the
# rows older than a time are among those of the spans with ``min_ts`` below
# it (retention, ``_EXPIRED``) and the rows from a time on among those of the
# spans with ``max_ts`` from it (a restart's ``keyed_channels``); each row is
# then filtered on its own ts_us, so both are exact whatever the clock did,
# and spans that overlap (ids SQLite gives again once retention deleted the
# table's last rows) only cost a row read twice.  Retention deletes a span
# once no row is left in its ids.  A row another program inserts has no span
# (retention and a restart would not see it): rows are the writer's, or were
# in the file when it was migrated (``_span_rows``).
MESSAGES_DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY,    -- append order
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    ts_us   INTEGER NOT NULL,
    sender  TEXT NOT NULL,
    dedupe  BLOB,
    frame   BLOB NOT NULL,
    key_id  TEXT                    -- frame sealed with this key (server/atrest.py); NULL: plaintext
)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_by_seq ON messages (channel, seq)",
    # schema 2's key index (schema 3 is without it)
    "DROP INDEX IF EXISTS messages_by_key",
    """CREATE TABLE IF NOT EXISTS channel_heads (
    channel TEXT PRIMARY KEY,
    seq     INTEGER NOT NULL        -- the last seq retention deleted
) WITHOUT ROWID""",
    # schema 4's time index (schema 5 is without it: commit_spans)
    "DROP INDEX IF EXISTS messages_by_ts",
)
#: schema 5's spans (a tuple of its own: bench/commits.py's layouts make them too)
SPANS_DDL = (
    # Keyed by max_ts, as a restart reads the spans from a time on; the whole
    # row is the key, so two commits never conflict (identical rows span the same).
    """CREATE TABLE IF NOT EXISTS commit_spans (
    max_ts   INTEGER NOT NULL,      -- the commit's greatest ts_us
    first_id INTEGER NOT NULL,      -- its least messages.id
    last_id  INTEGER NOT NULL,      -- its greatest
    min_ts   INTEGER NOT NULL,      -- its least ts_us
    PRIMARY KEY (max_ts, first_id, last_id, min_ts)
) WITHOUT ROWID""",
    # retention reads the spans with a row older than its cutoff
    "CREATE INDEX IF NOT EXISTS commit_spans_by_min ON commit_spans (min_ts)",
)
MESSAGES_DDL += SPANS_DDL
SCHEMA_VERSION = 5

OTHER_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id      TEXT PRIMARY KEY,
    record  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS device_cursors (
    user    TEXT NOT NULL,
    device  TEXT NOT NULL,
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (user, device, channel)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_cursors (
    channel TEXT NOT NULL,
    user    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
-- How far each user's messages have reached any of their devices, per channel:
-- with read_cursors, the per-recipient status of every message (server/status.py).
-- Scheduled messages and escalations: the API's process fires them (server/timers.py).
-- AUTOINCREMENT: an id is never given twice, as a fired message's key derives from it.
CREATE TABLE IF NOT EXISTS timers (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    due_us     INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    unique_key TEXT UNIQUE,
    body       BLOB NOT NULL
);
-- Who an escalation step fired for: only those, never a row per recipient per message.
CREATE TABLE IF NOT EXISTS escalations (
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    user    TEXT NOT NULL,
    step    INTEGER NOT NULL,
    PRIMARY KEY (channel, seq, user, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivered_cursors (
    channel TEXT NOT NULL,
    user    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
-- A user's first click on a link of a message (server/clicks.py): rare, so a row each.
CREATE TABLE IF NOT EXISTS clicks (
    channel TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    link    TEXT NOT NULL,
    user    TEXT NOT NULL,
    ts_us   INTEGER NOT NULL,
    PRIMARY KEY (channel, seq, link, user)
) WITHOUT ROWID;
""" + OUTBOX_SCHEMA

#: the whole schema, for a new file (a store's own file is set up by ``prepare_schema``)
SCHEMA = OTHER_SCHEMA + "".join(f"{statement};\n" for statement in MESSAGES_DDL)


def prepare_schema(conn: sqlite3.Connection, patience_ms: int = 600_000) -> None:
    """Create the store's tables, or bring a file of schema 1 to 4 to schema 5.

    Several workers open one file together: the first takes the write lock
    and creates or migrates; the others wait for it (up to ``patience_ms``,
    as a migration copies every message once) and find it done.
    """
    (busy,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute(f"PRAGMA busy_timeout={patience_ms}")
    try:
        conn.executescript(OTHER_SCHEMA)
        _prepare_messages(conn)
    finally:
        conn.execute(f"PRAGMA busy_timeout={busy}")


def _prepare_messages(conn: sqlite3.Connection) -> None:
    if _schema_version(conn) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if (version := _schema_version(conn)) < SCHEMA_VERSION:
            row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
                               ).fetchone()
            started, copied = time.monotonic(), None
            if row is not None and "WITHOUT ROWID" in row[0].upper():
                copied = _migrate_from_1(conn)
            for statement in MESSAGES_DDL:
                conn.execute(statement)
            spanned = _span_rows(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if copied is not None:
                log.warning("store schema 1 -> %d: %d messages copied and indexed in %.1f s",
                            SCHEMA_VERSION, copied, time.monotonic() - started)
            elif spanned:
                log.warning("store schema %d -> %d: %d messages spanned in %.1f s",
                            version, SCHEMA_VERSION, spanned, time.monotonic() - started)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ValueError(f"the store is of schema {version}, newer than this relay's ({SCHEMA_VERSION}):"
                         " start the version that wrote it")
    return int(version)


def _migrate_from_1(conn: sqlite3.Connection) -> int:
    """Copy schema 1's messages (clustered by channel and seq) into schema 2's
    table, in that order, inside the caller's transaction; return how many."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
    key_id = "key_id" if "key_id" in columns else "NULL"
    conn.execute("ALTER TABLE messages RENAME TO messages_v1")
    conn.execute("DROP INDEX IF EXISTS messages_by_time")
    conn.execute("DROP INDEX IF EXISTS messages_by_key")
    conn.execute(MESSAGES_DDL[0])
    copied = conn.execute("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame, key_id)"
                          f" SELECT channel, seq, ts_us, sender, dedupe, frame, {key_id} FROM messages_v1"
                          " ORDER BY channel, seq").rowcount
    conn.execute("DROP TABLE messages_v1")
    return int(copied)


def _span_rows(conn: sqlite3.Connection) -> int:
    """Give the rows of a store older than schema 5 their spans, inside the
    caller's transaction: one span per ``MAX_BATCH`` rows in id order (as
    many as a commit holds at most); return how many rows.  Each chunk is
    read once, by rowid."""
    spanned, start = 0, -(1 << 63)
    while True:
        last, first, max_ts, min_ts, count = conn.execute(
            "SELECT max(id), min(id), max(ts_us), min(ts_us), count(*) FROM"
            " (SELECT id, ts_us FROM messages WHERE id >= ? ORDER BY id LIMIT ?)",
            (start, MAX_BATCH)).fetchone()
        if not count:
            return spanned
        conn.execute(INSERT_SPAN, (max_ts, first, last, min_ts))
        spanned += count
        start = last + 1


def keys_since(conn: sqlite3.Connection, channel: str, since_us: int) -> Iterator[tuple[bytes, int, int]]:
    """``(key, seq, ts_us)`` of ``channel``'s keyed messages from ``since_us`` on, newest first.

    The channel's tail is read backwards by seq until a message is older than
    ``since_us``, not every message it ever had: its times follow its seqs
    (both given at sequencing; ts_us from the wall clock, on which the dedupe
    span is measured too, unless that clock stepped back: docs/DESIGN.md).
    """
    rows = conn.execute("SELECT dedupe, seq, ts_us FROM messages INDEXED BY messages_by_seq"
                        " WHERE channel = ? ORDER BY seq DESC", (channel,))
    try:
        for key, seq, ts_us in rows:
            if ts_us < since_us:
                return
            if key is not None:
                yield bytes(key), seq, ts_us
    finally:
        rows.close()


def _switch_to_wal(conn: sqlite3.Connection, patience: float = 5.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the file's lock.

    Turning a new file to WAL takes an exclusive lock, and SQLite refuses it
    at once ("database is locked"), without waiting out the busy timeout,
    while another connection holds a lock: several workers opening a new
    store together meet this (a few opens in a hundred on two cores).
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore:
    """The embedded default store: one file ``fenghuo.db`` under the data dir."""

    def __init__(self, data_dir: str | os.PathLike[str], fsync: str = "always",
                 ring_size: int = 1024, outbox: Outbox | None = None,
                 cipher: FrameCipher | None = None) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}")
        self.path = Path(data_dir) / DB_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        # Under "always" nothing leaves the relay (ring, fan-out, ack) before
        # its batch is on disk; otherwise it leaves at once and the batch follows.
        self.durable_acks = fsync == "always"
        self.ring_size = ring_size
        #: the webhook endpoints' filters (None: no webhooks, no outbox rows)
        self.outbox = outbox
        self._thread: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fenghuo-store-read")
        self._local = threading.local()
        self._conn = self._connect()
        prepare_schema(self._conn)
        #: the writing connection and its queue (records and webhook records, in order)
        self._writer = SQLiteWriter(self.path, full_sync=fsync != "off")
        #: copies the WAL into the file beside the writer, not inside its commits
        self.checkpointer = Checkpointer(
            self._connect, int(os.environ.get(CHECKPOINT_PAGES_ENV) or CHECKPOINT_PAGES))
        #: seals frames as they are written, opens them as they are read (None: plaintext)
        self.cipher = cipher
        atrest.prepare(self._conn, cipher)
        self.failure: BaseException | None = None
        #: records appended and not yet handed back (touched by the loop thread only)
        self.backlog = 0
        #: the writer's thread counts (read by /metrics): batches taken, the records
        #: in them, and the batches that reached MAX_BATCH (more was queued)
        self.batches = self.batch_records = self.full_batches = 0
        #: Where a held publish's way from its arrival to its ack goes, a batch at a
        #: time (/metrics; docs/PERFORMANCE.md): the oldest record's wait until the
        #: writer takes its batch, the batch's write (the transaction and its sync),
        #: and from the commit to the loop having released the batch (acks queued).
        self.batch_wait = Histogram()
        self.write_time = Histogram()
        self.handback = Histogram()
        #: when each batch handed back and not yet released was committed (monotonic)
        self._committed: deque[float] = deque()
        self._handback_delay = float(os.environ.get(HANDBACK_DELAY_ENV) or 0)
        self._write_delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
        self.on_pressure: Callable[[bool], None] = lambda high: None
        self._pressed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        _switch_to_wal(conn)
        # FULL syncs the WAL at every commit (one commit per batch); NORMAL only
        # at checkpoints: committed data survives a process crash, not power loss.
        conn.execute(f"PRAGMA synchronous={'NORMAL' if self.fsync == 'off' else 'FULL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        # Checkpoints are the checkpointer's (server/checkpointer.py), never a
        # reader's or another writer's commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def connect(self) -> sqlite3.Connection:
        """A new connection to the store's file, set up as the store's own."""
        return self._connect()

    def _reader_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    # ------------------------------------------------------------ identity

    def identity(self) -> str:
        """A random id made when the store was created: the relay's epoch prefix."""
        # Several workers may open a new store at once: the first id written wins.
        self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                           (os.urandom(6).hex(),))
        (store_id,) = self._conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        return str(store_id)

    # ------------------------------------------------------------ writing

    def start(self, loop: asyncio.AbstractEventLoop,
              on_batch: Callable[[list[Record] | None], None]) -> None:
        if self.durable_acks and len(os.sched_getaffinity(0)) > 1:
            # the writer's acks wait for the GIL no longer than this (WRITER_SWITCH_INTERVAL)
            sys.setswitchinterval(WRITER_SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._write_forever, args=(loop, on_batch),
                                        name="fenghuo-store-write", daemon=True)
        self.checkpointer.start()
        self._thread.start()

    def append(self, record: Record) -> None:
        """Queue ``record``; records are written, and handed back, in this order.

        A HeldReply or a Turn only travels the queue (a reply or an action
        that must wait for everything before it): nothing of it is written.
        """
        self._writer.push(record)
        self.backlog += 1
        if self.backlog > BACKLOG_HIGH and not self._pressed:
            self._pressed = True
            self.on_pressure(True)

    def emit(self, record: OutboxRecord) -> None:
        """Queue a webhook event (or the sender's note about one) for the writer.

        An event is written in the transaction of the record queued just before
        it (the message or state it describes), never in a later one.  Typed
        records are not handed back to the loop and not counted in ``backlog``.
        """
        if self.outbox is not None:
            self._writer.push(record)

    def written(self, count: int) -> None:
        """The writer handed back ``count`` records (called on the loop thread)."""
        self.backlog -= count
        if self._committed:
            self.handback.observe(time.monotonic() - self._committed.popleft())
        if self._pressed and self.backlog < BACKLOG_LOW:
            self._pressed = False
            self.on_pressure(False)

    def save_group(self, group_id: str, record: dict[str, Any]) -> asyncio.Future[bool] | None:
        self.append(GroupSave(group_id, orjson.dumps(record)))
        return None

    def save_device_cursors(self, user: str, device: str,
                            positions: dict[str, int]) -> asyncio.Future[bool] | None:
        self.append(DeviceCursors(user, device, positions))
        return None

    def save_read_cursor(self, channel: str, user: str, seq: int) -> None:
        self.append(ReadCursor(channel, user, seq))

    def save_delivered_cursor(self, channel: str, user: str, seq: int) -> None:
        self.append(DeliveredCursor(channel, user, seq))

    def timers_done(self, ids: list[int], escalated: list[tuple[str, int, str, int]]) -> None:
        """Delete fired timers and file ``(channel, seq, user, step)`` escalations, in one
        transaction with the webhook events emitted right after (server/timers.py)."""
        self.append(TimersDone(list(ids), list(escalated)))

    def save_click(self, click: Click) -> None:
        self.append(ClickSave(click))

    def expire(self, prefix: str, cutoff_us: int, keep_prefixes: list[str]) -> None:
        """Delete messages of channels starting with ``prefix`` older than ``cutoff_us``,
        and their clicks, except channels under one of ``keep_prefixes`` (they have rules
        of their own)."""
        self.append(Expiry(prefix, cutoff_us, list(keep_prefixes)))

    def _write_forever(self, loop: asyncio.AbstractEventLoop,
                       on_batch: Callable[[list[Record] | None], None]) -> None:
        writer = self._writer
        outbox = None if self.outbox is None else self._write_outbox
        while (batch := writer.take(MAX_BATCH)) is not None:
            taken = time.monotonic()
            self.batch_wait.observe(taken - _oldest_arrival(batch, taken))
            self.batches += 1
            self.batch_records += len(batch)
            self.full_batches += len(batch) >= MAX_BATCH
            if self._write_delay:
                time.sleep(self._write_delay)               # WRITE_DELAY_ENV
            try:
                records = writer.write(batch, self.cipher, _WRITES, outbox)
            except BaseException as exc:   # a full disk, a broken file: stop accepting
                self.failure = exc
                log.critical("store write failed; the relay stops sequencing", exc_info=exc)
                loop.call_soon_threadsafe(on_batch, None)
                return
            committed = time.monotonic()
            self.write_time.observe(committed - taken)
            if records:
                self._committed.append(committed)
                if self._handback_delay:
                    time.sleep(self._handback_delay)        # HANDBACK_DELAY_ENV
                loop.call_soon_threadsafe(on_batch, records)
            # After the handback: what a round leaves to the writer delays the
            # next batch, not this one's acks.
            try:
                self.checkpointer.after_batch(writer)
            except sqlite3.Error:
                # Committed all the same (in the WAL); the next round copies it.
                log.exception("store checkpoint failed")

    def writer_schedstat(self) -> SchedStat:
        """The writer thread's :class:`SchedStat` (zeros before it starts or where
        the kernel does not say)."""
        thread = self._thread
        if thread is None or thread.native_id is None:
            return SchedStat()
        return thread_schedstat(thread.native_id)

    def _write_outbox(self, conn: SQLiteWriter, ordered: list[Any]) -> None:
        """The outbox rows of this transaction, in queue order (so a stream's events keep
        the order they were emitted in): messages' events, emitted events, and what the
        sender learnt (server/outbox.py)."""
        outbox = self.outbox
        assert outbox is not None
        rows: list[tuple[Any, ...]] = []
        for record in ordered:
            if isinstance(record, Sequenced):
                rows += outbox.message_rows(record.channel, record.seq, record.frame)
            elif isinstance(record, WebhookEvent):
                rows += outbox.rows(record)
            elif isinstance(record, Delivered):
                conn.executemany("DELETE FROM webhook_outbox WHERE id = ?", [(i,) for i in record.ids])
            elif isinstance(record, Failed):
                conn.execute("UPDATE webhook_outbox SET attempts = ?, next_us = ?, last_error = ?,"
                             " dead = ? WHERE id = ?", (record.attempts, record.next_us,
                                                        record.error, int(record.dead), record.id))
            elif isinstance(record, Replay):
                now = time.time_ns() // 1000
                for i in record.ids:
                    conn.execute("INSERT INTO webhook_outbox (endpoint, stream, event_id, type, payload,"
                                 " seq, created_us) SELECT endpoint, stream, event_id, type, payload, seq, ?"
                                 " FROM webhook_outbox WHERE id = ? AND dead = 1", (now, i))
                    conn.execute("DELETE FROM webhook_outbox WHERE id = ? AND dead = 1", (i,))
            elif isinstance(record, EndpointState):
                if record.disabled:
                    conn.execute("INSERT OR REPLACE INTO webhook_endpoints (name, disabled_us, reason)"
                                 " VALUES (?, ?, ?)", (record.name, time.time_ns() // 1000,
                                                       record.reason))
                else:
                    conn.execute("DELETE FROM webhook_endpoints WHERE name = ?", (record.name,))
        if rows and self.cipher is not None:
            # A message.created row holds no payload: its message is sealed in messages.
            rows = [(endpoint, stream, event_id, type_, None if payload is None else self.cipher.seal_blob(
                payload, atrest.outbox_aad(endpoint, event_id)), created, seq)
                for endpoint, stream, event_id, type_, payload, created, seq in rows]
        if rows:
            conn.executemany("INSERT INTO webhook_outbox (endpoint, stream, event_id, type, payload,"
                             " created_us, seq) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        """Write what is queued, then stop the threads."""
        if self._thread is not None and self._thread.is_alive():
            self._writer.stop()
            self._thread.join(30)
        self.checkpointer.stop()
        if self._thread is None or not self._thread.is_alive():
            self._writer.close()
        self._reader.shutdown(wait=True)
        self._conn.close()

    # ------------------------------------------------------------ reading

    def recent(self, channel: str) -> list[tuple[int, bytes]]:
        """The channel's most recent ``(seq, frame)``s, oldest first: its ring at first touch."""
        rows = self._conn.execute(
            "SELECT seq, frame, key_id FROM messages WHERE channel = ? ORDER BY seq DESC LIMIT ?",
            (channel, self.ring_size)).fetchall()
        return self._frames(channel, reversed(rows))

    def expired_head(self, channel: str) -> int:
        """The last seq of ``channel`` retention deleted (0: none): its head when
        retention left no row of it."""
        row = self._conn.execute("SELECT seq FROM channel_heads WHERE channel = ?", (channel,)).fetchone()
        return 0 if row is None else int(row[0])

    def _frames(self, channel: str, rows: Iterable[tuple[int, bytes, str | None]]
                ) -> list[tuple[int, bytes]]:
        """``(seq, frame)`` of ``(seq, stored frame, key_id)`` rows: sealed ones opened."""
        cipher = self.cipher
        return [(seq, atrest.frame_of(cipher, channel, seq, frame, kid)) for seq, frame, kid in rows]

    def dedupe_keys(self, channel: str, since_us: int) -> list[tuple[bytes, int, int]]:
        """``channel``'s idempotency keys from ``since_us`` on, ``(key, seq, ts_us)``,
        oldest first: its dedupe window after a restart."""
        keys = list(keys_since(self._conn, channel, since_us))
        keys.reverse()
        return keys

    def find_key(self, channel: str, key: bytes, seqs: list[int], since_us: int) -> tuple[int, int] | None:
        """``(seq, ts_us)`` of the message at one of ``seqs`` on ``channel`` stored under
        ``key`` from ``since_us`` on, or None: the window's answer for a key it gave up
        early, which it remembers with its seq (one row read each, by (channel, seq))."""
        for seq in seqs:
            row = self._conn.execute(
                "SELECT ts_us FROM messages WHERE channel = ? AND seq = ? AND dedupe = ? AND ts_us >= ?",
                (channel, seq, key, since_us)).fetchone()
            if row is not None:
                return seq, row[0]
        return None

    async def read(self, channel: str, after: int, before: int, limit: int) -> list[bytes]:
        """Frames with ``after < seq < before``: the oldest ``limit`` of them."""
        rows = await self.read_with_seqs(channel, after, before, limit)
        return [frame for _, frame in rows]

    async def read_with_seqs(self, channel: str, after: int, before: int,
                             limit: int) -> list[tuple[int, bytes]]:
        """``(seq, frame)`` with ``after < seq < before``: the oldest ``limit`` of them."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read, channel, after, before, limit)

    def _read(self, channel: str, after: int, before: int, limit: int) -> list[tuple[int, bytes]]:
        rows = self._reader_conn().execute(
            "SELECT seq, frame, key_id FROM messages WHERE channel = ? AND seq > ? AND seq < ?"
            " ORDER BY seq LIMIT ?", (channel, after, before, limit)).fetchall()
        return self._frames(channel, rows)

    async def read_latest(self, channel: str, before: int, limit: int) -> list[bytes]:
        """The ``limit`` frames just below ``before``, oldest first (paging backwards)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read_latest, channel, before, limit)

    def _read_latest(self, channel: str, before: int, limit: int) -> list[bytes]:
        rows = self._reader_conn().execute(
            "SELECT seq, frame, key_id FROM messages WHERE channel = ? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?", (channel, before, limit)).fetchall()
        return [frame for _, frame in self._frames(channel, reversed(rows))]

    async def read_by_time(self, channel: str, since_us: int, until_us: int,
                           limit: int) -> list[bytes]:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, self._read_by_time, channel, since_us, until_us, limit)

    def _read_by_time(self, channel: str, since_us: int, until_us: int,
                      limit: int) -> list[bytes]:
        rows = self._reader_conn().execute(
            # By seq, ts_us filtered: a time range alone (schema 4's messages_by_ts,
            # or commit_spans now) reads every channel's messages of the range.
            "SELECT seq, frame, key_id FROM messages INDEXED BY messages_by_seq"
            " WHERE channel = ? AND ts_us >= ? AND ts_us < ?"
            " ORDER BY seq LIMIT ?", (channel, since_us, until_us, limit)).fetchall()
        return [frame for _, frame in self._frames(channel, rows)]

    def device_cursors(self, user: str, device: str) -> dict[str, int]:
        """Where ``device`` of ``user`` last said it had got to, per channel."""
        return dict(self._conn.execute(
            "SELECT channel, seq FROM device_cursors WHERE user = ? AND device = ?", (user, device)))

    def read_cursors(self) -> list[tuple[str, str, int]]:
        """Every ``(channel, user, seq)`` read cursor (loaded once at start-up)."""
        return self._conn.execute("SELECT channel, user, seq FROM read_cursors").fetchall()

    def delivered_cursors(self) -> list[tuple[str, str, int]]:
        """Every ``(channel, user, seq)`` delivery cursor (loaded once at start-up)."""
        return self._conn.execute("SELECT channel, user, seq FROM delivered_cursors").fetchall()

    def clicks(self) -> list[Click]:
        """Every first click (loaded once at start-up)."""
        return [Click(*row) for row in self._conn.execute(
            "SELECT channel, seq, link, user, ts_us FROM clicks")]

    def load_groups(self) -> list[dict[str, Any]]:
        return [orjson.loads(r[0]) for r in self._conn.execute("SELECT record FROM groups")]

    def direct_channels(self) -> list[str]:
        """Every direct chat the store knows: those with a stored message and those
        retention emptied (``channel_heads``), which exist as much (PROTOCOL §5.1)."""
        return [r[0] for r in self._conn.execute(
            "SELECT channel FROM messages WHERE channel LIKE 'dm:%'"
            " UNION SELECT channel FROM channel_heads WHERE channel LIKE 'dm:%'")]

    def keyed_channels(self, since_us: int) -> list[str]:
        """The channels with a keyed message from ``since_us`` on: those whose
        dedupe window a restart loads (``dedupe_keys``), found in one pass over
        the rows of the commits with a message that recent (``commit_spans``)."""
        return [r[0] for r in self._conn.execute(
            "SELECT DISTINCT m.channel FROM commit_spans s CROSS JOIN messages m"
            " ON m.id BETWEEN s.first_id AND s.last_id"
            " WHERE s.max_ts >= ? AND m.ts_us >= ? AND m.dedupe IS NOT NULL", (since_us, since_us))]

    def all_rows(self, channel: str) -> Iterable[tuple[int, int, str, bytes]]:
        """Every stored message of ``channel``: ``(seq, ts_us, sender, frame)`` (export, tests)."""
        return [(seq, ts, sender, atrest.frame_of(self.cipher, channel, seq, frame, kid))
                for seq, ts, sender, frame, kid in self._conn.execute(
                    "SELECT seq, ts_us, sender, frame, key_id FROM messages WHERE channel = ?"
                    " ORDER BY seq", (channel,))]


# ---------------------------------------------------------------- the writes

def _oldest_arrival(batch: list[Any], default: float) -> float:
    """When the first record of ``batch`` that came from a client arrived (the
    loop's monotonic clock), ``default`` if none did."""
    for r in batch:
        t_recv = getattr(r, "t_recv", 0.0)
        if t_recv:
            return float(t_recv)
    return default


def _write_group(w: SQLiteWriter, r: GroupSave) -> None:
    w.execute("INSERT OR REPLACE INTO groups (id, record) VALUES (?, ?)", (r.group_id, r.record))


def _write_device_cursors(w: SQLiteWriter, r: DeviceCursors) -> None:
    w.executemany("INSERT OR REPLACE INTO device_cursors (user, device, channel, seq)"
                  " VALUES (?, ?, ?, ?)",
                  [(r.user, r.device, channel, seq) for channel, seq in r.positions.items()])


def _write_read_cursor(w: SQLiteWriter, r: ReadCursor) -> None:
    w.execute("INSERT OR REPLACE INTO read_cursors (channel, user, seq) VALUES (?, ?, ?)",
              (r.channel, r.user, r.seq))


def _write_delivered_cursor(w: SQLiteWriter, r: DeliveredCursor) -> None:
    # Several workers write it (each for the syncs of its own sessions): never backwards.
    w.execute("INSERT INTO delivered_cursors (channel, user, seq) VALUES (?, ?, ?)"
              " ON CONFLICT (channel, user) DO UPDATE SET seq = max(seq, excluded.seq)",
              (r.channel, r.user, r.seq))


def _write_timers_done(w: SQLiteWriter, r: TimersDone) -> None:
    w.executemany("DELETE FROM timers WHERE id = ?", [(i,) for i in r.ids])
    w.executemany("INSERT OR IGNORE INTO escalations (channel, seq, user, step)"
                  " VALUES (?, ?, ?, ?)", r.escalated)


def _write_click(w: SQLiteWriter, r: ClickSave) -> None:
    # Several workers may record the same first click: the earliest row stays.
    c: Click = r.click
    w.execute("INSERT OR IGNORE INTO clicks (channel, seq, link, user, ts_us) VALUES (?, ?, ?, ?, ?)",
              (c.channel, c.seq, c.link, c.user, c.ts_us))


# The rows older than a cutoff (bound twice): among those of the spans with
# a row that old, each kept or not by its own ts_us (schema 5, MESSAGES_DDL).
_EXPIRED = ("FROM commit_spans s INDEXED BY commit_spans_by_min CROSS JOIN messages m"
            " ON m.id BETWEEN s.first_id AND s.last_id WHERE s.min_ts < ? AND m.ts_us < ?")


def _prefix_where(r: Expiry, column: str) -> tuple[str, list[Any]]:
    """The SQL condition on ``column`` (a channel) of the channels ``r`` expires,
    and its parameters: the most specific rule wins, so longer prefixes with a
    rule of their own are kept out."""
    where = f"substr({column}, 1, ?) = ?"
    params: list[Any] = [len(r.prefix), r.prefix]
    for other in r.keep_prefixes:
        where += f" AND substr({column}, 1, ?) != ?"
        params += [len(other), other]
    return where, params


def _write_expiry(w: SQLiteWriter, r: Expiry) -> None:
    where, params = _prefix_where(r, "m.channel")
    expired = [r.cutoff_us, r.cutoff_us, *params]
    # The channel's head outlives its rows: a restart continues after it.
    w.execute(f"INSERT INTO channel_heads (channel, seq) SELECT m.channel, max(m.seq) {_EXPIRED}"
              f" AND {where} GROUP BY m.channel"
              " ON CONFLICT (channel) DO UPDATE SET seq = max(seq, excluded.seq)", expired)
    # A message's clicks go with it, as do those of a message already gone.
    click_where, click_params = _prefix_where(r, "channel")
    w.execute(f"DELETE FROM clicks WHERE {click_where} AND NOT EXISTS (SELECT 1 FROM messages m"
              " WHERE m.channel = clicks.channel AND m.seq = clicks.seq AND m.ts_us >= ?)",
              [*click_params, r.cutoff_us])
    w.execute(f"DELETE FROM messages WHERE id IN (SELECT m.id {_EXPIRED} AND {where})", expired)
    # A span none of whose rows is left goes (its ids may be given again).
    w.execute("DELETE FROM commit_spans WHERE min_ts < ? AND NOT EXISTS (SELECT 1 FROM messages"
              " WHERE messages.id BETWEEN commit_spans.first_id AND commit_spans.last_id)",
              (r.cutoff_us,))


#: how each record other than a message is written (messages: SQLiteWriter itself)
_WRITES: dict[type, Callable[[SQLiteWriter, Any], None]] = {
    GroupSave: _write_group,
    DeviceCursors: _write_device_cursors,
    ReadCursor: _write_read_cursor,
    DeliveredCursor: _write_delivered_cursor,
    TimersDone: _write_timers_done,
    ClickSave: _write_click,
    Expiry: _write_expiry,
}
