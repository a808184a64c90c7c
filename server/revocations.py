"""Token revocations: written by ``fenghuo revoke``, kept in the store, read by every worker.

A row revokes one token id (``jti``, until that token's ``exp``: after it the
token is refused as expired anyway, so the row is deleted) or every token of a
user issued before a time.  Each worker reads the rows newer than the last it
saw every ``revocation_interval`` (docs/PROTOCOL.md §5.7): one indexed query
on its own connection, so the event loop never waits behind the store's writer.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from fenghuo.server.store import DB_FILE
from fenghuo.tokens import LEEWAY, Grants

SCHEMA = """
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT,                -- a token id, or NULL
    user TEXT,               -- a user, or NULL
    before REAL,             -- user rows: tokens issued (iat) before this are revoked
    until REAL               -- jti rows: the token's exp; the row is dropped after it
);
"""


def _connect(data_dir: str | Path) -> sqlite3.Connection:
    path = Path(data_dir) / DB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    return conn


def revoke(data_dir: str | Path, *, jti: str | None = None, until: float | None = None,
           user: str | None = None, before: float | None = None) -> None:
    """Store one revocation: ``jti`` (with its token's ``until`` = exp) or ``user`` (``before``)."""
    if (jti is None) == (user is None):
        raise ValueError("revoke a jti or a user")
    if jti is not None and until is None:
        raise ValueError("revoking a jti needs the token's exp")
    conn = _connect(data_dir)
    try:
        conn.execute("INSERT INTO revocations (jti, user, before, until) VALUES (?, ?, ?, ?)",
                     (jti, user, None if user is None else (before or time.time()), until))
    finally:
        conn.close()


class Revocations:
    """The revocations in force, as this worker last read them."""

    def __init__(self, data_dir: str | Path) -> None:
        self._conn = _connect(data_dir)
        self._last = 0
        self.jtis: dict[str, float] = {}       # jti -> its token's exp
        self.users: dict[str, float] = {}      # user -> tokens issued before this are revoked
        self.poll()     # in force from the first HELLO after a restart

    def poll(self) -> bool:
        """Read revocations stored since the last poll; True if there were any."""
        horizon = time.time() - LEEWAY
        if any(until < horizon for until in self.jtis.values()):
            # Their tokens are refused as expired now: forget them (a write,
            # so only when there is something to forget).
            self._conn.execute("DELETE FROM revocations WHERE until < ?", (horizon,))
            self.jtis = {j: u for j, u in self.jtis.items() if u >= horizon}
        rows = self._conn.execute("SELECT id, jti, user, before, until FROM revocations "
                                  "WHERE id > ? ORDER BY id", (self._last,)).fetchall()
        for row_id, jti, user, before, until in rows:
            self._last = row_id
            if jti is not None:
                self.jtis[jti] = until
            elif user is not None:
                self.users[user] = max(before, self.users.get(user, 0.0))
        return bool(rows)

    def revoked(self, grants: Grants) -> bool:
        if grants.jti and grants.jti in self.jtis:
            return True
        before = self.users.get(grants.user)
        return before is not None and grants.issued < before

    def close(self) -> None:
        self._conn.close()
