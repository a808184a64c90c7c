# The store's writer: one SQLite connection driven through the C API
# (core/writer.pyx).

cdef struct MessageRow:
    const char* channel
    Py_ssize_t channel_len
    int64_t seq
    int64_t ts_us
    const char* sender
    Py_ssize_t sender_len
    const char* dedupe              # NULL: no idempotency key
    Py_ssize_t dedupe_len
    const char* frame
    Py_ssize_t frame_len
    Py_ssize_t order                # its place in the batch: equal keys keep it


# A commit's row of commit_spans (server/store.py, schema 5): the least and
# greatest messages.id its rows were given, the least and greatest ts_us.
cdef struct CommitSpan:
    int64_t first_id
    int64_t last_id
    int64_t min_ts
    int64_t max_ts


cdef class _Statement:
    cdef sqlite3_stmt* stmt
    cdef int params


@cython.final
cdef class SQLiteWriter:
    cdef sqlite3* db
    cdef readonly str path
    cdef dict _statements             # SQL -> _Statement, prepared once
    cdef _Statement _insert_message
    cdef _Statement _insert_span
    cdef _Statement _begin
    cdef _Statement _commit
    cdef _Statement _rollback
    # The queue: the loop appends under the GIL; the writer takes the list.
    cdef list _pending
    cdef PyThread_type_lock _wake     # held while nobody waits to be woken
    cdef bint _waiting
    cdef bint _stopped
    # Frames in the WAL after the last commit (its hook's count; the WAL
    # restarts from 0 at a BEGIN once every frame is copied into the file).
    cdef int _wal_frames
    # Busy-handler calls before the writer gives up waiting for the write lock.
    cdef int _busy_tries

    cdef int _check(self, int rc) except -1
    cdef _Statement _prepare(self, str sql)
    cdef int _bind(self, _Statement st, object params) except -1
    cdef int _run(self, _Statement st) except -1
    cdef int _insert_messages(self, list messages, list sealed, str key_id, bint transaction) except -1
    cdef void _abort(self)
