# The store's writer (server/store.py runs it on its own thread): one SQLite
# connection through the C API, prepared statements, one transaction per
# batch.  The GIL is held only to read the batch's records; SQLite's work
# (every step, the commit and its fsync) runs without it, so the event loop
# never waits on the writer.

from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport qsort
from libc.string cimport memcmp
from posix.unistd cimport usleep

import sqlite3 as _sqlite3

cdef extern from "walbuf.h" nogil:
    const char* FH_WALBUF_VFS
    int fh_walbuf_register()

# One statement for every message row; key_id NULL is a plaintext frame.
_INSERT_MESSAGE = ("INSERT OR REPLACE INTO messages (channel, seq, ts_us, sender, dedupe, frame,"
                   " key_id) VALUES (?, ?, ?, ?, ?, ?, ?)")
# A commit's one row of commit_spans (schema 5, server/store.py): what
# retention and a restart find messages by time through, in place of a time
# index entry per message.  OR IGNORE: an identical row (the whole row is its
# key) already spans the same rows.
INSERT_SPAN = ("INSERT OR IGNORE INTO commit_spans (max_ts, first_id, last_id, min_ts)"
                " VALUES (?, ?, ?, ?)")


cdef object _error(sqlite3* db):
    return _sqlite3.OperationalError(
        f"{sqlite3_errmsg(db).decode('utf-8', 'replace')} (SQLite code {sqlite3_extended_errcode(db)})")


cdef int _count_wal_frames(void* frames, sqlite3* db, const char* name, int n) noexcept nogil:
    """SQLite's WAL hook, called in the writer's COMMIT (without the GIL): note
    the frames now in the WAL.  Being set, it also turns SQLite's automatic
    checkpoint off (that is a WAL hook too): the store's checkpointer copies
    the WAL into the file on its own thread (server/checkpointer.py)."""
    (<int*>frames)[0] = n
    return SQLITE_OK


# How long the writer sleeps between two tries at the file's write lock while
# another worker's writer holds it.  SQLite's own busy handler
# (sqlite3_busy_timeout) sleeps 1, 2, 5, 10, ... up to 100 ms a try, far
# longer than a batch holds the lock (a few ms): in the default deployment
# under `always` two workers' writers taking turns slept 15 ms a try (strace)
# and the one-to-one p99 at 10,000 msgs/s was 0.8-1.5 s, 53-70 ms with this
# (bench/README.md, "The tail under `--fsync always`").
cdef enum:
    BUSY_SLEEP_US = 250


cdef int _wait_for_lock(void* tries_left, int tries) noexcept nogil:
    """The writer's busy handler (without the GIL): sleep ``BUSY_SLEEP_US`` and
    try again, until the busy timeout's worth of tries is spent."""
    if tries >= (<int*>tries_left)[0]:
        return 0
    usleep(BUSY_SLEEP_US)
    return 1


cdef class _Statement:
    def __dealloc__(self):
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)


@cython.final
cdef class SQLiteWriter:
    """The store's one writing connection and its queue.

    ``push`` (loop thread) queues a record; ``take`` (writer thread) waits,
    without the GIL, for records and returns them in queue order; ``write``
    writes one batch in one transaction.
    """

    def __cinit__(self):
        self.db = NULL
        self._wake = NULL

    def __init__(self, path, bint full_sync, int busy_timeout_ms=5000, str insert_sql=None):
        self.path = str(path)
        cdef bytes name = self.path.encode()
        cdef const char* vfs = NULL
        cdef int rc
        if full_sync:
            # The WAL's frames gathered into one write a commit (core/walbuf.h:
            # only where every commit syncs, as the sync writes them).
            rc = fh_walbuf_register()
            if rc != SQLITE_OK:
                raise _sqlite3.OperationalError(f"cannot register the WAL's VFS (SQLite code {rc})")
            vfs = FH_WALBUF_VFS
        # NOMUTEX: one thread at a time uses this connection (the writer's;
        # close() after it has stopped), so SQLite need not lock it per call.
        rc = sqlite3_open_v2(name, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
                             | SQLITE_OPEN_NOMUTEX, vfs)
        if rc != SQLITE_OK:
            error = _error(self.db) if self.db != NULL else _sqlite3.OperationalError(f"cannot open {path}")
            sqlite3_close_v2(self.db)
            self.db = NULL
            raise error
        self._busy_tries = busy_timeout_ms * 1000 // BUSY_SLEEP_US
        sqlite3_busy_handler(self.db, _wait_for_lock, &self._busy_tries)
        # FULL syncs the WAL at every commit (one commit per batch); NORMAL only
        # at checkpoints: committed data survives a process crash, not power loss.
        self._check(sqlite3_exec(self.db, b"PRAGMA synchronous=FULL" if full_sync
                                 else b"PRAGMA synchronous=NORMAL", NULL, NULL, NULL))
        # The pages a batch touches (the table's last pages, each channel's last
        # leaf of messages_by_seq: server/store.py) stay cached between batches.
        self._check(sqlite3_exec(self.db, b"PRAGMA cache_size=-65536", NULL, NULL, NULL))
        # No checkpoint inside a commit: SQLite's own (wal_autocheckpoint) copies
        # the whole WAL into the file in the commit that crosses its size,
        # holding that batch's acks and every batch queued behind it (30-150
        # ms of CPU at 256 MiB, every 2-10 s at 50,000 msgs/s: bench/README.md,
        # "The tail under --fsync always").  This hook replaces it and counts the
        # frames; the store's checkpointer copies them on its own thread and
        # the writer finishes the last few between batches (``checkpoint``).
        self._wal_frames = 0
        sqlite3_wal_hook(self.db, _count_wal_frames, &self._wal_frames)
        self._statements = {}
        # insert_sql: another table's statement binding the same seven values in
        # the same order (bench/commits.py's --layout); the store's is _INSERT_MESSAGE.
        self._insert_message = self._prepare(_INSERT_MESSAGE if insert_sql is None else insert_sql)
        self._insert_span = self._prepare(INSERT_SPAN)
        # IMMEDIATE: the write lock is taken (waiting out busy_timeout while
        # another worker writes) at BEGIN, never refused halfway through.
        self._begin = self._prepare("BEGIN IMMEDIATE")
        self._commit = self._prepare("COMMIT")
        self._rollback = self._prepare("ROLLBACK")
        self._pending = []
        self._wake = PyThread_allocate_lock()
        if self._wake == NULL:
            raise MemoryError()
        PyThread_acquire_lock(self._wake, WAIT_LOCK)

    def __dealloc__(self):
        self._statements = None
        if self.db != NULL:
            sqlite3_close_v2(self.db)
        if self._wake != NULL:
            PyThread_free_lock(self._wake)

    def close(self):
        """Close the connection (statements first); the writer is unusable after."""
        self._statements = None
        self._insert_message = self._insert_span = self._begin = self._commit = self._rollback = None
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    # ------------------------------------------------------------ the queue

    def push(self, record):
        """Queue ``record`` (loop thread); wakes the writer if it waits."""
        self._pending.append(record)
        if self._waiting:
            self._waiting = False
            PyThread_release_lock(self._wake)

    def stop(self):
        """``take`` returns None once everything queued before this was taken."""
        self._stopped = True
        if self._waiting:
            self._waiting = False
            PyThread_release_lock(self._wake)

    def take(self, Py_ssize_t limit):
        """Everything queued, oldest first, waiting for it without the GIL: at most
        ``limit`` records, and the webhook records that follow them (an event is
        written in the transaction of the record queued just before it).
        None once stopped and empty."""
        cdef list batch
        cdef Py_ssize_t n, i
        while True:
            n = len(self._pending)
            if n and n <= limit:
                batch, self._pending = self._pending, []
                return batch
            if n:
                i = limit
                while i < n and not isinstance(self._pending[i], Record):
                    i += 1
                batch = self._pending[:i]
                del self._pending[:i]
                return batch
            if self._stopped:
                return None
            # Woken by push or stop; a spare wake-up only goes round the loop again.
            self._waiting = True
            with nogil:
                PyThread_acquire_lock(self._wake, WAIT_LOCK)

    @property
    def queued(self):
        return len(self._pending)

    @property
    def wal_frames(self):
        """Frames in the WAL after the last commit (0 before the first)."""
        return self._wal_frames

    def checkpoint(self):
        """Copy what the WAL holds into the file (PASSIVE: waiting for no reader
        and no other writer), without the GIL; return ``(frames in the WAL,
        frames copied)``.  Run between batches once the checkpointer has copied
        all but the last few frames: with every frame copied, the next BEGIN
        starts the WAL again from its beginning, so it stays bounded."""
        cdef int log = 0, copied = 0, rc
        if self.db == NULL:
            raise _sqlite3.ProgrammingError("the store's writer is closed")
        with nogil:
            rc = sqlite3_wal_checkpoint_v2(self.db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &copied)
        if rc != SQLITE_OK and rc != SQLITE_BUSY:
            raise _error(self.db)
        return log, copied

    # ------------------------------------------------------------ writing

    def write(self, list ordered, object cipher, dict writes, object outbox):
        """Write ``ordered`` (a batch as taken) in one transaction; return its Records
        (what the loop gets back), in order.

        Messages are inserted here; every other written record by
        ``writes[type(record)](self, record)``; ``outbox(self, ordered)``, when
        given, writes the batch's webhook rows.  ``cipher`` seals frames first.
        """
        cdef list records = [], messages = [], others = [], sealed = None
        cdef str key_id = None
        cdef Sequenced m
        for r in ordered:
            if type(r) is Sequenced:
                messages.append(r)
                records.append(r)
            elif type(r) is HeldReply or type(r) is Turn:
                records.append(r)        # travels the queue only
            elif isinstance(r, Record):
                others.append(r)
                records.append(r)
        if not messages and not others and len(records) == len(ordered):
            return records
        if messages and cipher is not None:
            # Sealed before the transaction opens; the rows carry the key's id.
            key_id = cipher.current
            sealed = [cipher.seal(m.ch.name, m.seq, m.frame) for m in messages]
        if messages and not others and outbox is None:
            # Messages alone (the usual batch): BEGIN, the rows and COMMIT with
            # one release of the GIL, so one wait to take it back from a busy loop.
            self._insert_messages(messages, sealed, key_id, True)
            return records
        self._run(self._begin)
        try:
            if outbox is not None:
                outbox(self, ordered)
            if messages:
                self._insert_messages(messages, sealed, key_id, False)
            for r in others:
                writes[type(r)](self, r)
            self._run(self._commit)
        except BaseException:
            self._abort()
            raise
        return records

    cdef void _abort(self):
        if not sqlite3_get_autocommit(self.db):
            sqlite3_exec(self.db, b"ROLLBACK", NULL, NULL, NULL)

    def execute(self, str sql, params=()):
        """Run one statement (prepared once per distinct ``sql``) with ``params``."""
        cdef _Statement st = self._prepare(sql)
        self._bind(st, params)
        self._run(st)

    def executemany(self, str sql, rows):
        cdef _Statement st = self._prepare(sql)
        for params in rows:
            self._bind(st, params)
            self._run(st)

    cdef int _check(self, int rc) except -1:
        if rc != SQLITE_OK:
            raise _error(self.db)
        return 0

    cdef _Statement _prepare(self, str sql):
        cdef _Statement st = self._statements.get(sql)
        if st is not None:
            return st
        if self.db == NULL:
            raise _sqlite3.ProgrammingError("the store's writer is closed")
        st = _Statement.__new__(_Statement)
        cdef bytes text = sql.encode()
        self._check(sqlite3_prepare_v3(self.db, text, <int>len(text), SQLITE_PREPARE_PERSISTENT,
                                       &st.stmt, NULL))
        st.params = sqlite3_bind_parameter_count(st.stmt)
        self._statements[sql] = st
        return st

    cdef int _bind(self, _Statement st, object params) except -1:
        """Bind ``params``; str and bytes are bound in place (SQLITE_STATIC): the
        caller keeps them alive until the statement has run."""
        cdef Py_ssize_t n
        cdef const char* text
        cdef int i = 0
        if len(params) != st.params:
            raise _sqlite3.ProgrammingError(f"{st.params} parameters expected, {len(params)} given")
        for value in params:
            i += 1
            if value is None:
                rc = sqlite3_bind_null(st.stmt, i)
            elif isinstance(value, int):
                rc = sqlite3_bind_int64(st.stmt, i, <sqlite3_int64>value)
            elif isinstance(value, float):
                rc = sqlite3_bind_double(st.stmt, i, <double>value)
            elif isinstance(value, str):
                text = PyUnicode_AsUTF8AndSize(value, &n)
                rc = sqlite3_bind_text(st.stmt, i, text, <int>n, SQLITE_STATIC)
            elif isinstance(value, bytes):
                rc = sqlite3_bind_blob(st.stmt, i, PyBytes_AS_STRING(value), <int>PyBytes_GET_SIZE(value),
                                       SQLITE_STATIC)
            else:
                value = bytes(value)
                rc = sqlite3_bind_blob(st.stmt, i, PyBytes_AS_STRING(value), <int>PyBytes_GET_SIZE(value),
                                       SQLITE_TRANSIENT)
            self._check(rc)
        return 0

    cdef int _run(self, _Statement st) except -1:
        cdef int rc
        with nogil:
            rc = _step(st.stmt)
        return self._check(rc)

    cdef int _insert_messages(self, list messages, list sealed, str key_id, bint transaction) except -1:
        """Insert every message row, then the commit's span: their fields are read
        with the GIL, the rows inserted without it; ``transaction``: in a
        transaction of their own, BEGIN and COMMIT in the same release of the GIL."""
        cdef Py_ssize_t n = len(messages), i, kid_len = 0
        cdef const char* kid = NULL
        cdef MessageRow* rows = <MessageRow*>PyMem_Malloc(n * sizeof(MessageRow))
        cdef MessageRow* row
        cdef Sequenced m
        cdef bytes frame
        cdef sqlite3_stmt* stmt = self._insert_message.stmt
        cdef sqlite3_stmt* span_stmt = self._insert_span.stmt
        cdef CommitSpan span = CommitSpan(0, 0, 0, 0)
        cdef int rc = SQLITE_OK
        if rows == NULL:
            raise MemoryError()
        try:
            if key_id is not None:
                kid = PyUnicode_AsUTF8AndSize(key_id, &kid_len)
            for i in range(n):
                m = <Sequenced>messages[i]
                row = &rows[i]
                row.channel = PyBytes_AS_STRING(m.ch.key)
                row.channel_len = PyBytes_GET_SIZE(m.ch.key)
                row.seq = <int64_t>m.seq
                row.ts_us = <int64_t>m.ts_us
                row.sender = PyUnicode_AsUTF8AndSize(m.sender, &row.sender_len)
                if m.dedupe is None:
                    row.dedupe = NULL
                    row.dedupe_len = 0
                else:
                    row.dedupe = PyBytes_AS_STRING(m.dedupe)
                    row.dedupe_len = PyBytes_GET_SIZE(m.dedupe)
                frame = m.frame if sealed is None else <bytes>sealed[i]
                row.frame = PyBytes_AS_STRING(frame)
                row.frame_len = PyBytes_GET_SIZE(frame)
                row.order = i
                if i == 0 or row.ts_us < span.min_ts:
                    span.min_ts = row.ts_us
                if i == 0 or row.ts_us > span.max_ts:
                    span.max_ts = row.ts_us
            with nogil:
                # In (channel, seq) order: a channel's rows of the batch go into
                # messages_by_seq one after another, into the leaf the previous
                # one left hot (and sit together in the table, for history).
                qsort(rows, n, sizeof(MessageRow), _row_order)
                if transaction:
                    rc = _step(self._begin.stmt)
                if rc == SQLITE_OK:
                    rc = _insert_rows(self.db, stmt, rows, n, kid, kid_len, &span)
                if rc == SQLITE_OK:
                    rc = _insert_span(span_stmt, &span)
                if rc == SQLITE_OK and transaction:
                    rc = _step(self._commit.stmt)
        finally:
            PyMem_Free(rows)
        if rc != SQLITE_OK:
            error = _error(self.db)
            if transaction:
                self._abort()
            raise error
        return 0


cdef int _row_order(const void* a, const void* b) noexcept nogil:
    """qsort's comparison of two MessageRows: by channel, seq, then place in the
    batch (so a (channel, seq) given twice keeps its order: the later replaces)."""
    cdef const MessageRow* x = <const MessageRow*>a
    cdef const MessageRow* y = <const MessageRow*>b
    cdef int c
    cdef Py_ssize_t n
    if x.channel != y.channel:
        # A channel's rows share one name (its Channel's key): compared only across channels.
        n = x.channel_len if x.channel_len < y.channel_len else y.channel_len
        c = memcmp(x.channel, y.channel, n)
        if c != 0:
            return c
        if x.channel_len != y.channel_len:
            return -1 if x.channel_len < y.channel_len else 1
    if x.seq != y.seq:
        return -1 if x.seq < y.seq else 1
    return -1 if x.order < y.order else (1 if x.order > y.order else 0)


cdef int _step(sqlite3_stmt* stmt) noexcept nogil:
    """Run ``stmt`` to its end and reset it: SQLITE_OK, or its error code (the
    connection's errmsg kept for the caller)."""
    cdef int rc = sqlite3_step(stmt)
    while rc == SQLITE_ROW:
        rc = sqlite3_step(stmt)
    if rc != SQLITE_DONE:
        return sqlite3_reset(stmt)
    sqlite3_reset(stmt)
    return SQLITE_OK


cdef int _insert_rows(sqlite3* db, sqlite3_stmt* stmt, MessageRow* rows, Py_ssize_t n,
                      const char* kid, Py_ssize_t kid_len, CommitSpan* span) noexcept nogil:
    """Insert ``rows`` through the messages' statement, noting the least and
    greatest id they were given in ``span``: SQLITE_OK, or the failed step's
    error code."""
    cdef Py_ssize_t i
    cdef MessageRow* row
    cdef int rc
    cdef sqlite3_int64 rowid
    for i in range(n):
        row = &rows[i]
        sqlite3_bind_text(stmt, 1, row.channel, <int>row.channel_len, SQLITE_STATIC)
        sqlite3_bind_int64(stmt, 2, row.seq)
        sqlite3_bind_int64(stmt, 3, row.ts_us)
        sqlite3_bind_text(stmt, 4, row.sender, <int>row.sender_len, SQLITE_STATIC)
        if row.dedupe == NULL:
            sqlite3_bind_null(stmt, 5)
        else:
            sqlite3_bind_blob(stmt, 5, row.dedupe, <int>row.dedupe_len, SQLITE_STATIC)
        sqlite3_bind_blob(stmt, 6, row.frame, <int>row.frame_len, SQLITE_STATIC)
        if kid == NULL:
            sqlite3_bind_null(stmt, 7)
        else:
            sqlite3_bind_text(stmt, 7, kid, <int>kid_len, SQLITE_STATIC)
        rc = _step(stmt)
        if rc != SQLITE_OK:
            return rc
        # SQLite gives a new row the table's greatest id plus one, so a
        # commit's rows are numbered upwards; the least and greatest are kept
        # all the same, which holds however SQLite numbers them (once the
        # greatest id is at its limit, it picks unused ones at random).
        rowid = sqlite3_last_insert_rowid(db)
        if i == 0 or rowid < span.first_id:
            span.first_id = rowid
        if i == 0 or rowid > span.last_id:
            span.last_id = rowid
    return SQLITE_OK


cdef int _insert_span(sqlite3_stmt* stmt, const CommitSpan* span) noexcept nogil:
    """Insert the commit's row of commit_spans: SQLITE_OK, or the step's error code."""
    sqlite3_bind_int64(stmt, 1, span.max_ts)
    sqlite3_bind_int64(stmt, 2, span.first_id)
    sqlite3_bind_int64(stmt, 3, span.last_id)
    sqlite3_bind_int64(stmt, 4, span.min_ts)
    return _step(stmt)
