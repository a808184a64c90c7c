"""The store's WAL checkpoints, off the commit path.

Every commit appends the pages it changed to the WAL; a checkpoint copies them
into the database file, and the WAL starts again from its beginning at the
next write once every frame is copied (and no reader still reads one).
SQLite's own automatic checkpoint does that copy inside the commit that
crosses ``wal_autocheckpoint``: the whole WAL at once, holding that batch's
acks and every batch queued behind it (at 256 MiB, 30-150 ms of CPU every
2-10 s at 50,000 msgs/s; bench/README.md, "The tail under --fsync always").

Here the writer's connection does not checkpoint (core/writer.pyx: its WAL
hook counts the frames instead).  Once the WAL holds ``pages`` frames, a
thread with a connection of its own copies them (PASSIVE: it takes no lock a
writer needs, so commits go on meanwhile), pass after pass while the writer
appends, until only a few frames are left to copy.  The writer copies those
few itself between two batches (``after_batch``), so its next BEGIN finds
every frame copied and restarts the WAL: the file stays near ``pages`` frames
however long the load lasts.  Nothing about durability changes: a checkpoint
only copies committed frames, syncing the WAL before and the file after, and
a frame is overwritten only once the file holds it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from fenghuo.core import SQLiteWriter

log = logging.getLogger("fenghuo.store")

#: WAL frames (pages) at which a checkpoint starts: 256 MiB of 4 KiB pages.
#: Larger copies a page rewritten by many commits (a channel's last index
#: leaf) fewer times; the file on disk keeps the WAL's largest size.
CHECKPOINT_PAGES = 65536
#: Frames left to copy at which the checkpointer hands over to the writer:
#: its own copy of them, between two batches, is a few milliseconds at most.
HANDOVER_FRAMES = 512
#: Passes at most before handing over anyway (the writer waits for the next start).
MAX_PASSES = 8


class Checkpointer:
    """Copies the WAL into the file on its own thread; the writer finishes each round.

    ``after_batch`` is called by the writer thread after each batch, before
    the next; everything else runs on the checkpointer's thread.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], pages: int = CHECKPOINT_PAGES) -> None:
        self.pages = pages
        self._connect = connect
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: a round started (set by the writer) and not yet finished by it
        self._running = False
        #: the checkpointer left only a few frames: the writer copies them
        self._handed_over = False
        self._frames = 0
        #: checkpoint passes run by the checkpointer's thread, and by the writer
        self.passes = 0
        self.handovers = 0
        #: times the WAL started again from its beginning
        self.restarts = 0
        #: frames in the WAL after the last commit
        self.frames = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fenghuo-store-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    def after_batch(self, writer: SQLiteWriter) -> None:
        """The writer's part (its thread, between two batches): count the WAL,
        start a round when it is full, finish a round the checkpointer handed over."""
        frames = writer.wal_frames
        if frames < self._frames:
            self.restarts += 1
        self._frames = self.frames = frames
        if self._handed_over:
            self._handed_over = False
            writer.checkpoint()             # the last few frames: the next BEGIN restarts the WAL
            self.passes += 1
            self.handovers += 1
            self._running = False
        elif not self._running and frames >= self.pages:
            self._running = True
            self._wake.set()

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopped:
                    return
                try:
                    self._round(conn)
                except sqlite3.Error:
                    # The writer goes on; the WAL grows until a round succeeds
                    # (a full disk stops the writer itself).
                    log.exception("store checkpoint failed")
                    self._running = False
        finally:
            conn.close()

    def _round(self, conn: sqlite3.Connection) -> None:
        """PASSIVE passes until few frames are left, then hand over to the writer."""
        for _ in range(MAX_PASSES):
            if self._stopped:
                break
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.passes += 1
            if busy or frames < 0:
                # Another worker's checkpointer holds the checkpoint lock.
                time.sleep(0.01)
                continue
            if frames - copied <= HANDOVER_FRAMES:
                self._handed_over = True
                return
        # Not near enough: the writer starts another round at its next batch.
        self._running = False
