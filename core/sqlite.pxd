# The part of the SQLite C API the store's writer uses (core/writer.pyx);
# linked against the system libsqlite3 (setup.py), the library Python's own
# sqlite3 module uses too: one copy in the process, so POSIX locks on the
# store's file are shared correctly between the writer and the readers.
from libc.stdint cimport int64_t

cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
    ctypedef int64_t sqlite3_int64
    ctypedef void (*sqlite3_destructor_type)(void*)
    sqlite3_destructor_type SQLITE_STATIC
    sqlite3_destructor_type SQLITE_TRANSIENT

    enum:
        SQLITE_OK
        SQLITE_BUSY
        SQLITE_ROW
        SQLITE_DONE
        SQLITE_OPEN_READWRITE
        SQLITE_OPEN_CREATE
        SQLITE_OPEN_NOMUTEX
        SQLITE_PREPARE_PERSISTENT
        SQLITE_CHECKPOINT_PASSIVE

    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_busy_timeout(sqlite3* db, int ms)
    int sqlite3_busy_handler(sqlite3* db, int (*callback)(void*, int) noexcept nogil, void* arg)
    int sqlite3_exec(sqlite3* db, const char* sql, void* callback, void* arg, char** errmsg)
    int sqlite3_get_autocommit(sqlite3* db)
    const char* sqlite3_errmsg(sqlite3* db)
    int sqlite3_extended_errcode(sqlite3* db)

    int sqlite3_prepare_v3(sqlite3* db, const char* sql, int nbytes, unsigned int flags,
                           sqlite3_stmt** stmt, const char** tail)
    int sqlite3_bind_parameter_count(sqlite3_stmt* stmt)
    int sqlite3_bind_int64(sqlite3_stmt* stmt, int i, sqlite3_int64 value)
    int sqlite3_bind_double(sqlite3_stmt* stmt, int i, double value)
    int sqlite3_bind_null(sqlite3_stmt* stmt, int i)
    int sqlite3_bind_text(sqlite3_stmt* stmt, int i, const char* text, int n,
                          sqlite3_destructor_type destructor)
    int sqlite3_bind_blob(sqlite3_stmt* stmt, int i, const void* data, int n,
                          sqlite3_destructor_type destructor)
    int sqlite3_step(sqlite3_stmt* stmt)
    int sqlite3_reset(sqlite3_stmt* stmt)
    int sqlite3_finalize(sqlite3_stmt* stmt)
    sqlite3_int64 sqlite3_last_insert_rowid(sqlite3* db)

    void* sqlite3_wal_hook(sqlite3* db, int (*callback)(void*, sqlite3*, const char*, int) noexcept nogil,
                           void* arg)
    int sqlite3_wal_checkpoint_v2(sqlite3* db, const char* name, int mode, int* log, int* checkpointed)
