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
from dataclasses import dataclass
from pathlib import Path

from fenghuo.server.store import DB_FILE
from fenghuo.tokens import LEEWAY, Grants, verify_token

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


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation: a token id until its token's exp, or a user's tokens issued before a time."""

    jti: str | None = None
    until: float | None = None
    user: str | None = None
    before: float | None = None

    @classmethod
    def of(cls, secret: str, *, jti: str | None = None, exp: float | None = None,
           token: str | None = None, user: str | None = None,
           before: float | None = None) -> Revocation:
        """What ``fenghuo revoke`` and the API's ``revoke`` are asked, checked.

        A ``token`` names its own jti and exp (verified with ``secret``: an
        expired one needs no revoking).  :class:`ValueError` (a
        :class:`TokenError` for the token) says what is wrong, in one line.
        """
        if sum(x is not None for x in (jti, token, user)) != 1:
            raise ValueError("revoke one of a jti, a token or a user")
        if token is not None:
            grants = verify_token(secret, token)
            if not grants.jti:
                raise ValueError("the token has no jti: revoke its user instead")
            jti, exp = grants.jti, grants.expires
        if jti is not None:
            if exp is None:
                raise ValueError("revoking a jti needs its token's exp (or pass the token)")
            return cls(jti=jti, until=exp)
        return cls(user=user, before=before if before is not None else time.time())

    def describe(self) -> str:
        return (f"token {self.jti}" if self.jti is not None
                else f"tokens of {self.user} issued before {self.before:.0f}")


def revoke(data_dir: str | Path, revocation: Revocation) -> None:
    """Store ``revocation``: every worker applies it at its next read (``Revocations.poll``)."""
    conn = _connect(data_dir)
    try:
        conn.execute("INSERT INTO revocations (jti, user, before, until) VALUES (?, ?, ?, ?)",
                     (revocation.jti, revocation.user, revocation.before, revocation.until))
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
