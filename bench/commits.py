"""The durable store's commits, without a relay: ``python -m bench commits``.

Drives the store's writer (core/writer.pyx through server/store.py) on this
thread as the writer thread does under ``--fsync always``: ``--commits``
transactions of ``--batch`` messages spread over ``--channels`` channels,
once per WAL size in ``--wal-frames`` and per ``--checkpoint`` place
(``beside``: the store's checkpointer thread starts there and the writer
finishes each round between two commits, server/checkpointer.py; ``inside``:
SQLite's ``wal_autocheckpoint``, the commit that crosses it copies the WAL
into the file), alternating over ``--rounds``.  Per setting: the writer's CPU per message, WAL pages written
per commit, and commit latency (a batch's acks wait that long); then each
setting's writer CPU all told (commits, and filings or index builds), the
bytes its thread wrote (the WAL's frames) per message, and the p99 of a
batch's wait for its acks (its commit, plus a filing or build run just
before it on the writer's thread); ``deferred-attached``'s total adds its
filer thread's CPU, its WAL bytes leave out that thread's writes.  Each
``--without`` adds a setting with those indexes of the messages table
dropped first: what each costs the writer (the relay cannot run so).
``--layout`` compares other layouts of the messages table (``LAYOUTS``; the
``log`` ones build the channel index in a transaction of their own every
``--index-every`` messages, between two commits), and
``--page-size`` other page sizes, before building one.  ``--writers 2`` has two writers
commit in turn, each with its own half of the channels (as the default
deployment's workers own theirs): at one file (``--files shared``, as the
workers share the store now) or a file each (``own``).

It also times the floor: ``pwrite`` of 4 KiB and ``fdatasync`` on one file
in the store's directory, appended (the file grows, as a new WAL does) and
overwritten (as a WAL reused after a checkpoint is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from itertools import product
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fenghuo.server.checkpointer import Checkpointer

FRAME = bytes(110)
WAL_HEADER = 24
# a layout's other tables (and commit_spans, server/store.py's SPANS_DDL: _prepare_layout)
_HEADS = """CREATE TABLE channel_heads (channel TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
PRAGMA user_version=5;"""
_COLUMNS = "seq INTEGER NOT NULL, ts_us INTEGER NOT NULL, sender TEXT NOT NULL, dedupe BLOB, frame BLOB NOT NULL, key_id TEXT"
_CHANNELS = "CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
# The row's key is the channel's number and the seq packed in one integer, so
# the table (the rowid B-tree) is itself the index by (channel, seq).
_PACKED_ID = "((SELECT id FROM channels WHERE name = ?1) << 40) | ?2"
#: messages table layouts to compare: (DDL made before the store opens the file,
#: the writer's insert binding (channel, seq, ts_us, sender, dedupe, frame, key_id),
#: SQL that files the rows after ``?`` (an id) in the channel index, or None)
LAYOUTS: dict[str, tuple[str, str | None, str | None]] = {
    "schema5": ("", None, None),
    # schema 1 without its (channel, ts_us) index: the table clustered by (channel, seq)
    # (its rows have no id: their spans are of nothing, a row each commit all the same)
    "clustered": (f"CREATE TABLE messages (channel TEXT NOT NULL, {_COLUMNS},"
                  " PRIMARY KEY (channel, seq)) WITHOUT ROWID;" + _HEADS, None, None),
    "packed": (_CHANNELS + f"CREATE TABLE messages (id INTEGER PRIMARY KEY, channel TEXT NOT NULL,"
               f" {_COLUMNS});" + _HEADS,
               "INSERT OR REPLACE INTO messages (id, channel, seq, ts_us, sender, dedupe, frame, key_id)"
               f" VALUES ({_PACKED_ID}, ?1, ?2, ?3, ?4, ?5, ?6, ?7)", None),
    # the same without the channel's name in the row (its number is in the key;
    # the column stays, NULL, for the store's own statement to compile)
    "packed-noname": (_CHANNELS + f"CREATE TABLE messages (id INTEGER PRIMARY KEY, channel TEXT,"
                      f" {_COLUMNS});" + _HEADS,
                      "INSERT OR REPLACE INTO messages (id, seq, ts_us, sender, dedupe, frame, key_id)"
                      f" VALUES ({_PACKED_ID}, ?2, ?3, ?4, ?5, ?6, ?7)", None),
    # schema 5's log without messages_by_seq; the index filed after the commits, in bulk
    "deferred": (f"CREATE TABLE messages (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, {_COLUMNS});"
                 "CREATE TABLE message_seqs (channel TEXT NOT NULL, seq INTEGER NOT NULL, id INTEGER"
                 " NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID;" + _HEADS, None,
                 "INSERT INTO message_seqs (channel, seq, id) SELECT channel, seq, id FROM messages"
                 " WHERE id > ? ORDER BY channel, seq"),
}
# schema 5 inserted without OR REPLACE, and with OR IGNORE: what the conflict
# clause costs (nothing measurable: bench/README.md, "The commit's rows in
# channel order")
LAYOUTS["insert"] = ("", "INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame, key_id)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", None)
LAYOUTS["ignore"] = ("", "INSERT OR IGNORE INTO messages (channel, seq, ts_us, sender, dedupe, frame, key_id)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", None)
# The same index in a file of its own, attached: filed by a thread of its own
# while the writer commits, as its lock is that file's, not the store's.
LAYOUTS["deferred-attached"] = (LAYOUTS["deferred"][0].replace("CREATE TABLE message_seqs", "CREATE TABLE"
                                                               " unused_seqs"), None, None)
# The channel index off the ack path (issue 15): each acked commit appends rows
# in rowid order and nothing else; every ``--index-every`` messages one
# transaction of its own on the writer's connection, between two commits,
# builds the index for the rows appended since, sorted by (channel, seq) so a
# channel's leaf is written once a build.  ``log``: into an index table
# (channel, seq) -> id, WITHOUT ROWID, the rows staying where they were
# appended; ``log-move``: the rows moved from an unindexed ``message_log`` into
# schema 5's messages table (with messages_by_seq), the log emptied.
LAYOUTS["log"] = (LAYOUTS["deferred"][0], None, None)
LAYOUTS["log-move"] = (f"CREATE TABLE message_log (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, {_COLUMNS});",
                       "INSERT INTO message_log (channel, seq, ts_us, sender, dedupe, frame, key_id)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", None)
#: a ``log`` layout's build: statements binding (the last id built, the last id
#: appended) if they have parameters
BUILDS: dict[str, tuple[str, ...]] = {
    "log": ("INSERT INTO message_seqs (channel, seq, id) SELECT channel, seq, id FROM messages"
            " WHERE id > ?1 AND id <= ?2 ORDER BY channel, seq",),
    # the build takes the whole log (nothing commits during it), so the delete
    # is SQLite's clear of the table, not a row at a time
    "log-move": ("INSERT INTO messages (channel, seq, ts_us, sender, dedupe, frame, key_id) SELECT channel, seq,"
                 " ts_us, sender, dedupe, frame, key_id FROM message_log ORDER BY channel, seq",
                 "DELETE FROM message_log"),
}
INDEX_FILE = "fenghuo-index.db"
_FILE_ATTACHED = ("INSERT INTO idx.message_seqs (channel, seq, id) SELECT channel, seq, id FROM main.messages"
                  " WHERE id > ? AND id <= ? ORDER BY channel, seq")


class _Filer:
    """Files the rows up to the id it is given, on its own thread and connection, into
    the attached index file (the ``deferred-attached`` layout)."""

    def __init__(self, directory: str) -> None:
        import queue
        import sqlite3
        import threading

        self.db = sqlite3.connect(Path(directory) / "fenghuo.db", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute(f"ATTACH DATABASE '{Path(directory) / INDEX_FILE}' AS idx")
        self.db.execute("PRAGMA idx.journal_mode=WAL")
        self.db.execute("PRAGMA idx.synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS idx.message_seqs (channel TEXT NOT NULL, seq INTEGER"
                        " NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID")
        self.todo: queue.Queue[int | None] = queue.Queue()
        self.cpu = 0.0
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        filed = 0
        while (upto := self.todo.get()) is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            self.db.execute("BEGIN")
            self.db.execute(_FILE_ATTACHED, (filed, upto))
            self.db.execute("COMMIT")
            self.cpu += time.thread_time() - c0
            self.times.append(time.perf_counter() - t0)
            filed = upto

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()
        self.db.close()


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("commits", help="the durable store's commits by WAL size, and the disk's "
                                       "fdatasync floor (bench/commits.py)")
    p.add_argument("--channels", type=int, default=100)
    p.add_argument("--batch", type=int, default=100, help="messages per commit")
    p.add_argument("--commits", type=int, default=2500)
    p.add_argument("--wal-frames", default="16384,65536",
                   help="wal_autocheckpoint values to compare (pages of 4 KiB)")
    p.add_argument("--checkpoint", default="beside,inside",
                   help="where the WAL is copied into the file, comma-separated: beside (the store's "
                        "checkpointer thread from --wal-frames on, the writer finishing each round "
                        "between commits: server/checkpointer.py) or inside (SQLite's "
                        "wal_autocheckpoint, in the commit that crosses it)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--without", action="append", default=[], metavar="INDEX[,INDEX]",
                   help="also measure with these indexes of the messages table dropped "
                        "(e.g. messages_by_seq); repeatable")
    p.add_argument("--layout", default="schema5",
                   help=f"messages table layouts to compare, comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--page-size", default="4096", help="page sizes to compare, comma-separated")
    p.add_argument("--file-every", type=int, default=8,
                   help="deferred layout: commits between two filings of the channel index")
    p.add_argument("--index-every", default="65536,262144",
                   help="log layouts: messages between two builds of the channel index, "
                        "comma-separated values to compare")
    p.add_argument("--writers", default="1",
                   help="writers to compare, comma-separated: N writers (as N workers) taking "
                        "turns commit by commit, each with its own share of the channels")
    p.add_argument("--files", default="shared",
                   help="with more than one writer, comma-separated: shared (one file, as the "
                        "default deployment's workers share one) or own (a file per writer)")
    p.add_argument("--dir", default=None, help="where the store goes (default: a temporary "
                                                "directory under /tmp)")
    p.set_defaults(func=cmd_commits)


def _percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))]


def _prepare_layout(directory: str, layout: str, page_size: int, names: list[str]) -> None:
    import sqlite3

    from fenghuo.server.store import SPANS_DDL

    ddl = LAYOUTS[layout][0]
    if not ddl and page_size == 4096:
        return
    db = sqlite3.connect(Path(directory) / "fenghuo.db", isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size={page_size}")
        db.execute("PRAGMA journal_mode=WAL")
        if ddl:
            db.executescript(ddl)
            for statement in SPANS_DDL:
                db.execute(statement)
            if "channels" in ddl:
                db.executemany("INSERT INTO channels (name) VALUES (?)", [(n,) for n in names])
    finally:
        db.close()


def commits(directory: str, channels: int, batch: int, count: int, wal_frames: int,
            without: tuple[str, ...] = (), layout: str = "schema5", page_size: int = 4096,
            file_every: int = 8, checkpoint: str = "beside", writers: int = 1,
            files: str = "shared", index_every: int = 65536) -> dict[str, float]:
    import sqlite3

    from fenghuo.core import Channel, ChannelKind, Sequenced, SQLiteWriter
    from fenghuo.server.store import _WRITES, SQLiteStore

    names = [f"dm:user-{i:06d}:user-{i + 1:06d}" for i in range(channels)]
    _prepare_layout(directory, layout, page_size, names)
    _, insert_sql, filing = LAYOUTS[layout]
    store = SQLiteStore(directory, fsync="always")
    if insert_sql is not None:
        store._writer.close()
        store._writer = SQLiteWriter(store.path, full_sync=True, insert_sql=insert_sql)
    if without:
        with sqlite3.connect(store.path) as db:
            for index in without:
                db.execute(f"DROP INDEX {index}")
        db.close()
    writer = store._writer
    # --wal-frames counts 4 KiB pages: the same WAL size whatever the page size
    checkpointer = None
    checkpointer_cpu = 0.0
    if checkpoint == "inside":
        writer.execute(f"PRAGMA wal_autocheckpoint={wal_frames * 4096 // page_size}")
    else:
        checkpointer = store.checkpointer
        checkpointer.pages = wal_frames * 4096 // page_size
        checkpointer.start()
    # Writers beyond the first, as the default deployment's other workers: a
    # connection of their own to the same file (``shared``), or a store of their
    # own in a directory of its own (``own``).  One thread drives them all in
    # turn, so this is their CPU, with no wait for the file's lock in it.
    others: list[tuple[SQLiteWriter, Checkpointer | None]] = []
    stores = []
    for j in range(1, writers):
        if files == "shared":
            other, beside = SQLiteWriter(store.path, full_sync=True), checkpointer
        else:
            sub = Path(directory) / f"writer-{j}"
            sub.mkdir()
            stores.append(SQLiteStore(sub, fsync="always"))
            other, beside = stores[-1]._writer, None
            if checkpoint != "inside":
                beside = stores[-1].checkpointer
                beside.pages = wal_frames * 4096 // page_size
                beside.start()
        if checkpoint == "inside":
            other.execute(f"PRAGMA wal_autocheckpoint={wal_frames * 4096 // page_size}")
        others.append((other, beside))
    turns = [(writer, checkpointer), *others]
    chans = [Channel(name, ChannelKind.DIRECT_CHAT, 16) for name in names]
    seqs = [0] * channels
    wals = [Path(directory) / "fenghuo.db-wal"] + [
        Path(directory) / (f"writer-{j}/fenghuo.db-wal" if files == "own" else "fenghuo.db-wal")
        for j in range(1, writers)]
    wal_frame = WAL_HEADER + page_size
    latencies: list[float] = []
    filings: list[float] = []
    # a commit's latency plus the filing or build run before it on the writer's
    # thread: how long the batch that came in meanwhile waits for its acks
    acks: list[float] = []
    held = 0.0
    cpu = filing_cpu = 0.0
    frames = grown = 0
    k = filed = 0
    # bytes the writer's thread hands the kernel inside its commits and filings
    # (the WAL's frames; the checkpointer's copy is its own thread's)
    written = 0
    # run every --file-every commits (a deferred filing) or --index-every messages (a log's build)
    builds = BUILDS.get(layout)
    statements = builds or ((filing,) if filing is not None else ())
    filer = _Filer(directory) if layout == "deferred-attached" else None
    try:
        for i in range(count):
            # writer j's channels are those c with c % writers == j (a worker owns its own)
            turn = i % writers
            records = []
            for _ in range(batch):
                c = (k * writers + turn) % channels
                k += 1
                seqs[c] += 1
                records.append(Sequenced(chans[c], seqs[c], 1_700_000_000_000_000 + k, "user-x", None, FRAME))
            wal = wals[turn]
            before = wal.stat().st_size if wal.exists() else 0
            t0, c0, b0 = time.perf_counter(), time.thread_time(), _written()
            w, beside = turns[turn]
            w.write(records, None, _WRITES, None)
            written += _written() - b0
            if beside is not None:
                # Between two commits in the store: counted in this one's time.
                beside.after_batch(w)
            cpu += time.thread_time() - c0
            latencies.append(time.perf_counter() - t0)
            acks.append(latencies[-1] + held)
            held = 0.0
            after = wal.stat().st_size
            if after > before:
                frames += (after - before) // wal_frame
                grown += 1
            last = i == count - 1
            if (filing is not None and len(latencies) % file_every == 0
                    or builds is not None and (k - filed >= index_every or last and k > filed)):
                # the last build counted too: every message's index is paid for
                t0, c0, b0 = time.perf_counter(), time.thread_time(), _written()
                writer.execute("BEGIN IMMEDIATE")
                for statement in statements:
                    writer.execute(statement, (filed, k)[:statement.count("?")])
                writer.execute("COMMIT")
                written += _written() - b0
                filing_cpu += time.thread_time() - c0
                filings.append(held := time.perf_counter() - t0)
                filed = k
            if filer is not None and len(latencies) % file_every == 0:
                filer.todo.put(k)
    finally:
        if filer is not None:
            filer.close()
            filing_cpu, filings = filer.cpu, filer.times
        for w, beside in others:
            if files == "shared":
                w.close()
            elif beside is not None:
                checkpointer_cpu += _thread_cpu(beside)
                beside.stop()
        for extra in stores:
            extra.close()
        if checkpointer is not None:
            checkpointer_cpu += _thread_cpu(checkpointer)
            checkpointer.stop()
        store.close()
    messages = count * batch
    return {"cpu_us_per_msg": cpu / messages * 1e6,
            "writer_cpu_us_per_msg": (cpu + filing_cpu) / messages * 1e6,
            "wal_bytes_per_msg": written / messages,
            "wal_pages_per_msg": written / messages / wal_frame,
            "ack_p99_ms": _percentile(acks, 0.99) * 1e3,
            "builds": len(filings),
            "filing_max_ms": max(filings) * 1e3 if filings else 0.0,
            "checkpointer_cpu_us_per_msg": checkpointer_cpu / (count * batch) * 1e6,
            "wal_pages_per_commit_while_growing": frames / max(1, grown),
            "p50_ms": _percentile(latencies, 0.5) * 1e3, "p99_ms": _percentile(latencies, 0.99) * 1e3,
            "max_ms": max(latencies) * 1e3, "mean_ms": statistics.fmean(latencies) * 1e3,
            "filing_cpu_us_per_msg": filing_cpu / (count * batch) * 1e6,
            "filing_p50_ms": _percentile(filings, 0.5) * 1e3 if filings else 0.0}


def _written() -> int:
    """Bytes this thread has passed to write(2) and its kind so far (``wchar``)."""
    with open("/proc/thread-self/io") as f:
        return int(f.read().split("wchar:")[1].split()[0])


def _thread_cpu(checkpointer: Checkpointer) -> float:
    """CPU seconds the checkpointer's thread has used (/proc/self/task/TID/schedstat)."""
    thread = checkpointer._thread
    if thread is None or thread.native_id is None:
        return 0.0
    return int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0]) / 1e9


def fdatasync_floor(directory: str, count: int = 2000) -> dict[str, dict[str, float]]:
    """pwrite(4 KiB) + fdatasync latency, appending and overwriting one file."""
    path = os.path.join(directory, "fdatasync.probe")
    block = b"x" * 4096
    out = {}
    for mode in ("append", "overwrite"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if mode == "overwrite":
                for i in range(count):
                    os.pwrite(fd, block, i * 4096)
                os.fsync(fd)
            lat = []
            for i in range(count):
                t0 = time.perf_counter()
                os.pwrite(fd, block, i * 4096)
                os.fdatasync(fd)
                lat.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(path)
        out[mode] = {"p50_ms": _percentile(lat, 0.5) * 1e3, "p90_ms": _percentile(lat, 0.9) * 1e3,
                     "p99_ms": _percentile(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3}
    return out


def cmd_commits(a: argparse.Namespace) -> int:
    sizes = [int(v) for v in a.wal_frames.split(",")]
    # a log layout once per --index-every
    layouts = [(layout, every) for layout in a.layout.split(",")
               for every in ([int(v) for v in a.index_every.split(",")] if layout in BUILDS else [0])]
    pages = [int(v) for v in a.page_size.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}; {a.channels} channels, {a.batch} messages "
          f"a commit, {a.commits} commits, --fsync always")
    variants = [()] + [tuple(v.split(",")) for v in a.without]
    places = a.checkpoint.split(",")
    writers = [(int(n), f) for n in a.writers.split(",") for f in a.files.split(",")
               if int(n) > 1 or f == a.files.split(",")[0]]
    if any(n > 1 for n, _ in writers) and (a.layout != "schema5" or a.without):
        # the second writer's statement and store are schema 5's
        print("--writers above 1 measures schema 5 only: no --layout or --without beside it")
        return 2
    for r in range(a.rounds):
        for frames in sizes:
            for (layout, every), page_size, without, place, (n, files) in product(layouts, pages, variants,
                                                                                  places, writers):
                with TemporaryDirectory(prefix="bench-commits-", dir=a.dir) as tmp:
                    res = commits(tmp, a.channels, a.batch, a.commits, frames, without, layout,
                                  page_size, a.file_every, place, n, files, every)
                dropped = f" without {','.join(without)}" if without else ""
                filing = (f" + filing {res['filing_cpu_us_per_msg']:.2f} us/msg (p50 "
                          f"{res['filing_p50_ms']:.1f} ms every {a.file_every} commits)"
                          if LAYOUTS[layout][2] or layout == "deferred-attached" else "")
                if every:
                    filing = (f" + index build {res['filing_cpu_us_per_msg']:.2f} us/msg ({res['builds']}"
                              f" builds, p50 {res['filing_p50_ms']:.1f} max {res['filing_max_ms']:.1f} ms)")
                    layout = f"{layout}/{every}"
                where = "wal_autocheckpoint" if place == "inside" else "checkpointer"
                turns = f" {n} writers ({'one file' if files == 'shared' else 'a file each'})" if n > 1 else ""
                print(f"round {r + 1} {layout} page {page_size} {where}={frames}{dropped}{turns}: "
                      f"writer CPU {res['cpu_us_per_msg']:.2f} us/msg{filing}"
                      + (f" + checkpointer {res['checkpointer_cpu_us_per_msg']:.2f} us/msg"
                         if place == "beside" else "") + ", "
                      f"{res['wal_pages_per_commit_while_growing']:.0f} WAL pages a commit (while it grows), "
                      f"commit p50 {res['p50_ms']:.2f} p99 {res['p99_ms']:.2f} max {res['max_ms']:.2f} ms; "
                      f"writer total {res['writer_cpu_us_per_msg']:.2f} us/msg, WAL "
                      f"{res['wal_bytes_per_msg']:.0f} B/msg ({res['wal_pages_per_msg']:.3f} pages), "
                      f"ack p99 {res['ack_p99_ms']:.2f} ms", flush=True)
    with TemporaryDirectory(prefix="bench-commits-", dir=a.dir) as tmp:
        for mode, res in fdatasync_floor(tmp).items():
            print(f"fdatasync floor ({mode} 4 KiB): p50 {res['p50_ms']:.3f} p90 {res['p90_ms']:.3f} "
                  f"p99 {res['p99_ms']:.3f} max {res['max_ms']:.3f} ms")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0
