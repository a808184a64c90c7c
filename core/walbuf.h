/* The store writer's WAL writes gathered into one write a commit.
 *
 * SQLite writes each WAL frame by two calls (its 24-byte header, then the
 * page), so a commit of many-to-many's batch (1,314 pages) made 2,628
 * pwrite calls; the same bytes in 44 calls cost the kernel less CPU a frame
 * (bench/README.md, "The WAL's frames gathered").  This VFS ("fenghuo-walbuf") wraps the default one: every file
 * is the default VFS's own file (so POSIX locks and the shared memory are
 * the same as every other connection's), and the WAL's writes are kept in
 * memory until SQLite next needs the file: a sync, a read, its size, a
 * truncation, any file control.  Durability is unchanged under
 * synchronous=FULL (the only mode it is used in: core/writer.pyx): a commit
 * syncs the WAL before it publishes the new frames in the wal-index, and
 * the sync writes the gathered frames first, so every frame a reader or a
 * later ack can see is in the file and synced, as before.  Under NORMAL a
 * commit publishes its frames without a sync, and they would not be in the
 * file yet: not used there.
 *
 * Frames written and not committed (a transaction rolled back after SQLite
 * spilled pages to the WAL) are dropped when the connection lets go of the
 * WAL's write lock: written later, they could overwrite frames another
 * connection committed meanwhile at the same place.
 */
#ifndef FENGHUO_WALBUF_H
#define FENGHUO_WALBUF_H

#include <sqlite3.h>
#include <string.h>

#define FH_WALBUF_VFS "fenghuo-walbuf"
/* A write this large goes to the file at once (a commit of 8,192 messages
 * writes 5-8 MiB of frames). */
#define FH_WALBUF_MAX (64 * 1024 * 1024)
/* The default VFS writes at most 128 KiB - 1 a call (os_unix.c, seekAndWrite,
 * masks the length with 0x1ffff): the frames go out in pieces of 31 pages. */
#define FH_WALBUF_CHUNK (31 * 4096)
#define FH_WAL_WRITE_LOCK 0         /* wal.c's WAL_WRITE_LOCK: the first shm lock */

typedef struct FhFile FhFile;
struct FhFile {
    sqlite3_file base;              /* pMethods: fh_methods */
    sqlite3_file* real;             /* the default VFS's file, allocated after this struct */
    FhFile* wal;                    /* a database: its open WAL */
    FhFile* db;                     /* a WAL: its database */
    int is_wal;
    char* buf;                      /* a WAL: frames not yet written, for [off, off + len) */
    sqlite3_int64 off;
    sqlite3_int64 len;
    sqlite3_int64 cap;
};

static sqlite3_vfs fh_vfs;

static int fh_flush(FhFile* p) {
    int rc = SQLITE_OK;
    sqlite3_int64 done, n;
    for (done = 0; rc == SQLITE_OK && done < p->len; done += n) {
        n = p->len - done < FH_WALBUF_CHUNK ? p->len - done : FH_WALBUF_CHUNK;
        rc = p->real->pMethods->xWrite(p->real, p->buf + done, (int)n, p->off + done);
    }
    p->len = 0;
    return rc;
}

static int fh_close(sqlite3_file* f) {
    FhFile* p = (FhFile*)f;
    int rc;
    /* What is left is uncommitted: every commit synced (fh_sync). */
    p->len = 0;
    if (p->db) p->db->wal = 0;
    if (p->wal) p->wal->db = 0;
    sqlite3_free(p->buf);
    p->buf = 0;
    rc = p->real->pMethods->xClose(p->real);
    return rc;
}

static int fh_read(sqlite3_file* f, void* z, int n, sqlite3_int64 off) {
    FhFile* p = (FhFile*)f;
    int rc = fh_flush(p);
    return rc != SQLITE_OK ? rc : p->real->pMethods->xRead(p->real, z, n, off);
}

static int fh_write(sqlite3_file* f, const void* z, int n, sqlite3_int64 off) {
    FhFile* p = (FhFile*)f;
    int rc;
    if (!p->is_wal)
        return p->real->pMethods->xWrite(p->real, z, n, off);
    if (p->len && off >= p->off && off + n <= p->off + p->len) {
        /* a frame written again in this transaction (SQLite rewrites in place) */
        memcpy(p->buf + (off - p->off), z, n);
        return SQLITE_OK;
    }
    if (p->len && off != p->off + p->len) {
        rc = fh_flush(p);
        if (rc != SQLITE_OK) return rc;
    }
    if (p->len + n > p->cap) {
        sqlite3_int64 cap = p->cap ? p->cap : 1 << 20;
        char* buf;
        while (cap < p->len + n && cap < FH_WALBUF_MAX) cap *= 2;
        if (p->len + n > cap) {
            rc = fh_flush(p);
            return rc != SQLITE_OK ? rc : p->real->pMethods->xWrite(p->real, z, n, off);
        }
        buf = sqlite3_realloc64(p->buf, cap);
        if (!buf) {
            rc = fh_flush(p);
            return rc != SQLITE_OK ? rc : p->real->pMethods->xWrite(p->real, z, n, off);
        }
        p->buf = buf;
        p->cap = cap;
    }
    if (!p->len) p->off = off;
    memcpy(p->buf + p->len, z, n);
    p->len += n;
    return SQLITE_OK;
}

static int fh_truncate(sqlite3_file* f, sqlite3_int64 size) {
    FhFile* p = (FhFile*)f;
    int rc = fh_flush(p);
    return rc != SQLITE_OK ? rc : p->real->pMethods->xTruncate(p->real, size);
}

static int fh_sync(sqlite3_file* f, int flags) {
    FhFile* p = (FhFile*)f;
    int rc = fh_flush(p);
    return rc != SQLITE_OK ? rc : p->real->pMethods->xSync(p->real, flags);
}

static int fh_file_size(sqlite3_file* f, sqlite3_int64* size) {
    FhFile* p = (FhFile*)f;
    int rc = fh_flush(p);
    return rc != SQLITE_OK ? rc : p->real->pMethods->xFileSize(p->real, size);
}

static int fh_lock(sqlite3_file* f, int lock) {
    return ((FhFile*)f)->real->pMethods->xLock(((FhFile*)f)->real, lock);
}

static int fh_unlock(sqlite3_file* f, int lock) {
    return ((FhFile*)f)->real->pMethods->xUnlock(((FhFile*)f)->real, lock);
}

static int fh_check_reserved_lock(sqlite3_file* f, int* out) {
    return ((FhFile*)f)->real->pMethods->xCheckReservedLock(((FhFile*)f)->real, out);
}

static int fh_file_control(sqlite3_file* f, int op, void* arg) {
    FhFile* p = (FhFile*)f;
    int rc = fh_flush(p);
    return rc != SQLITE_OK ? rc : p->real->pMethods->xFileControl(p->real, op, arg);
}

static int fh_sector_size(sqlite3_file* f) {
    return ((FhFile*)f)->real->pMethods->xSectorSize(((FhFile*)f)->real);
}

static int fh_device_characteristics(sqlite3_file* f) {
    return ((FhFile*)f)->real->pMethods->xDeviceCharacteristics(((FhFile*)f)->real);
}

static int fh_shm_map(sqlite3_file* f, int page, int size, int extend, void volatile** out) {
    sqlite3_file* r = ((FhFile*)f)->real;
    return r->pMethods->iVersion >= 2 && r->pMethods->xShmMap
        ? r->pMethods->xShmMap(r, page, size, extend, out) : SQLITE_IOERR;
}

static int fh_shm_lock(sqlite3_file* f, int offset, int n, int flags) {
    FhFile* p = (FhFile*)f;
    sqlite3_file* r = p->real;
    if (p->wal && flags == (SQLITE_SHM_UNLOCK | SQLITE_SHM_EXCLUSIVE)
            && offset <= FH_WAL_WRITE_LOCK && FH_WAL_WRITE_LOCK < offset + n)
        p->wal->len = 0;            /* uncommitted frames: never to be written now */
    return r->pMethods->iVersion >= 2 && r->pMethods->xShmLock
        ? r->pMethods->xShmLock(r, offset, n, flags) : SQLITE_IOERR;
}

static void fh_shm_barrier(sqlite3_file* f) {
    sqlite3_file* r = ((FhFile*)f)->real;
    if (r->pMethods->iVersion >= 2 && r->pMethods->xShmBarrier) r->pMethods->xShmBarrier(r);
}

static int fh_shm_unmap(sqlite3_file* f, int delete_flag) {
    sqlite3_file* r = ((FhFile*)f)->real;
    return r->pMethods->iVersion >= 2 && r->pMethods->xShmUnmap
        ? r->pMethods->xShmUnmap(r, delete_flag) : SQLITE_OK;
}

static int fh_fetch(sqlite3_file* f, sqlite3_int64 off, int n, void** out) {
    sqlite3_file* r = ((FhFile*)f)->real;
    *out = 0;
    return r->pMethods->iVersion >= 3 && r->pMethods->xFetch
        ? r->pMethods->xFetch(r, off, n, out) : SQLITE_OK;
}

static int fh_unfetch(sqlite3_file* f, sqlite3_int64 off, void* page) {
    sqlite3_file* r = ((FhFile*)f)->real;
    return r->pMethods->iVersion >= 3 && r->pMethods->xUnfetch
        ? r->pMethods->xUnfetch(r, off, page) : SQLITE_OK;
}

static const sqlite3_io_methods fh_methods = {
    3, fh_close, fh_read, fh_write, fh_truncate, fh_sync, fh_file_size, fh_lock, fh_unlock,
    fh_check_reserved_lock, fh_file_control, fh_sector_size, fh_device_characteristics,
    fh_shm_map, fh_shm_lock, fh_shm_barrier, fh_shm_unmap, fh_fetch, fh_unfetch,
};

#define FH_ROOT(vfs) ((sqlite3_vfs*)(vfs)->pAppData)

static int fh_open(sqlite3_vfs* vfs, sqlite3_filename name, sqlite3_file* f, int flags, int* out) {
    FhFile* p = (FhFile*)f;
    sqlite3_vfs* root = FH_ROOT(vfs);
    int rc;
    memset(p, 0, sizeof(*p));
    p->real = (sqlite3_file*)&p[1];
    rc = root->xOpen(root, name, p->real, flags, out);
    if (rc != SQLITE_OK || !p->real->pMethods) {
        p->base.pMethods = 0;
        return rc;
    }
    p->base.pMethods = &fh_methods;
    if ((flags & SQLITE_OPEN_WAL) && name) {
        /* the database's file is ours too: the same connection opened it */
        p->is_wal = 1;
        p->db = (FhFile*)sqlite3_database_file_object(name);
        if (p->db) p->db->wal = p;
    }
    return rc;
}

static int fh_delete(sqlite3_vfs* v, const char* name, int sync) {
    return FH_ROOT(v)->xDelete(FH_ROOT(v), name, sync);
}
static int fh_access(sqlite3_vfs* v, const char* name, int flags, int* out) {
    return FH_ROOT(v)->xAccess(FH_ROOT(v), name, flags, out);
}
static int fh_full_pathname(sqlite3_vfs* v, const char* name, int n, char* out) {
    return FH_ROOT(v)->xFullPathname(FH_ROOT(v), name, n, out);
}
static void* fh_dl_open(sqlite3_vfs* v, const char* name) {
    return FH_ROOT(v)->xDlOpen(FH_ROOT(v), name);
}
static void fh_dl_error(sqlite3_vfs* v, int n, char* out) {
    FH_ROOT(v)->xDlError(FH_ROOT(v), n, out);
}
static void (*fh_dl_sym(sqlite3_vfs* v, void* h, const char* sym))(void) {
    return FH_ROOT(v)->xDlSym(FH_ROOT(v), h, sym);
}
static void fh_dl_close(sqlite3_vfs* v, void* h) {
    FH_ROOT(v)->xDlClose(FH_ROOT(v), h);
}
static int fh_randomness(sqlite3_vfs* v, int n, char* out) {
    return FH_ROOT(v)->xRandomness(FH_ROOT(v), n, out);
}
static int fh_sleep(sqlite3_vfs* v, int us) {
    return FH_ROOT(v)->xSleep(FH_ROOT(v), us);
}
static int fh_current_time(sqlite3_vfs* v, double* out) {
    return FH_ROOT(v)->xCurrentTime(FH_ROOT(v), out);
}
static int fh_get_last_error(sqlite3_vfs* v, int n, char* out) {
    return FH_ROOT(v)->xGetLastError ? FH_ROOT(v)->xGetLastError(FH_ROOT(v), n, out) : 0;
}
static int fh_current_time_int64(sqlite3_vfs* v, sqlite3_int64* out) {
    return FH_ROOT(v)->xCurrentTimeInt64(FH_ROOT(v), out);
}

/* Register the VFS (once; not as the default).  Called with the GIL held. */
static int fh_walbuf_register(void) {
    static int done = 0;
    sqlite3_vfs* root;
    int rc;
    if (done) return SQLITE_OK;
    root = sqlite3_vfs_find(0);
    if (!root) return SQLITE_ERROR;
    fh_vfs.iVersion = 2;
    fh_vfs.szOsFile = (int)sizeof(FhFile) + root->szOsFile;
    fh_vfs.mxPathname = root->mxPathname;
    fh_vfs.zName = FH_WALBUF_VFS;
    fh_vfs.pAppData = root;
    fh_vfs.xOpen = fh_open;
    fh_vfs.xDelete = fh_delete;
    fh_vfs.xAccess = fh_access;
    fh_vfs.xFullPathname = fh_full_pathname;
    fh_vfs.xDlOpen = fh_dl_open;
    fh_vfs.xDlError = fh_dl_error;
    fh_vfs.xDlSym = fh_dl_sym;
    fh_vfs.xDlClose = fh_dl_close;
    fh_vfs.xRandomness = fh_randomness;
    fh_vfs.xSleep = fh_sleep;
    fh_vfs.xCurrentTime = fh_current_time;
    fh_vfs.xGetLastError = fh_get_last_error;
    fh_vfs.xCurrentTimeInt64 = fh_current_time_int64;
    rc = sqlite3_vfs_register(&fh_vfs, 0);
    if (rc == SQLITE_OK) done = 1;
    return rc;
}

#endif
