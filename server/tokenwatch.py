"""Tokens of live connections: close them when they expire or are revoked.

docs/PROTOCOL.md §5.7.  A connection is closed with ``TOKEN_EXPIRED`` once its
token's ``exp`` plus ``token_grace`` has passed without a REFRESH, and with
``TOKEN_REVOKED`` once a revocation read from the store covers its token.
Deadlines sit in a heap, so a sweep costs only the connections due; an entry
left by a REFRESH or a close is recognised as stale and dropped when due, or
before: once stale entries are half the heap, the heap is rebuilt without
them (``forget``).  Else a connection closed within its token's lifetime (a
day by default) would keep its Session alive until then: after a reconnect
storm of a million clients, a million closed Sessions.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from fenghuo.core import Connection, ErrorCode
from fenghuo.server.revocations import Revocations
from fenghuo.tokens import Grants

if TYPE_CHECKING:
    from fenghuo.server.session import Session


#: a heap smaller than this is not compacted (its stale entries cost little)
_COMPACT_FROM = 64


class TokenWatch:
    def __init__(self, grace: float, revocations: Revocations | None) -> None:
        self.grace = grace
        self.revocations = revocations
        self._due: list[tuple[float, int, Session]] = []
        self._order = itertools.count()      # ties never compare sessions
        #: entries of ``_due`` known stale (their session closed or refreshed since)
        self._stale = 0

    @property
    def deadlines(self) -> int:
        """Entries kept, the stale ones included (``fenghuo_token_deadlines``)."""
        return len(self._due)

    def deadline(self, session: Session) -> float:
        expires: float = session.grants.expires
        return expires + self.grace

    def watch(self, session: Session) -> None:
        """Track ``session``'s current token (after HELLO and after each REFRESH)."""
        heapq.heappush(self._due, (self.deadline(session), next(self._order), session))

    def forget(self) -> None:
        """A watched session closed or was refreshed: its entry is stale.

        When stale entries are half the heap or more it is rebuilt with the
        live ones only, a cost of O(n) once per n/2 stale entries.
        """
        self._stale += 1
        due = self._due
        if self._stale * 2 >= len(due) and len(due) >= _COMPACT_FROM:
            # In place: close_expired may be popping from this very list.
            due[:] = [entry for entry in due if self._live(entry)]
            heapq.heapify(due)
            self._stale = 0

    def _live(self, entry: tuple[float, int, Session]) -> bool:
        when, _, session = entry
        return not session.closing and session.authenticated and self.deadline(session) == when

    def is_revoked(self, grants: Grants) -> bool:
        return self.revocations is not None and self.revocations.revoked(grants)

    def close_expired(self) -> None:
        """Close the connections whose token's deadline passed (the relay's timer sweep)."""
        now = time.time()
        due = self._due
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            if not self._live(entry):
                # Closed, or refreshed since (its new deadline has its own entry).
                self._stale = max(0, self._stale - 1)
                continue
            session = entry[2]
            session.close_with_error(ErrorCode.TOKEN_EXPIRED,
                                     "token expired: REFRESH it, or reconnect with a new one")

    def close_revoked(self, connections: Iterable[Connection]) -> int:
        """Read new revocations; if any came, close the revoked among ``connections``
        (the hub's, all of them Sessions); how many."""
        closed = 0
        if self.revocations is not None and self.revocations.poll():
            for session in cast("list[Session]", list(connections)):
                if not session.closing and session.authenticated and self.is_revoked(session.grants):
                    session.close_with_error(ErrorCode.TOKEN_REVOKED, "token revoked")
                    closed += 1
        return closed
