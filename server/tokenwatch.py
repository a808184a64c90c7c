"""Tokens of live connections: close them when they expire or are revoked.

docs/PROTOCOL.md §5.7.  A connection is closed with ``TOKEN_EXPIRED`` once its
token's ``exp`` plus ``token_grace`` has passed without a REFRESH, and with
``TOKEN_REVOKED`` once a revocation read from the store covers its token.
Deadlines sit in a heap, so a sweep costs only the connections due; an entry
left by a REFRESH or a close is recognised as stale and dropped when due, or
before: a sweep that finds the heap over twice the open connections (and
64) rebuilds it without them.  Else a connection closed within its token's
lifetime (a day by default) would keep its Session alive until then: after
a reconnect storm of a million clients, a million closed Sessions.  The
sweep does it, not the close: nothing is added to a connection's close.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from fenghuo.core import Connection, Deadlines, ErrorCode
from fenghuo.server.revocations import Revocations
from fenghuo.tokens import Grants

if TYPE_CHECKING:
    from fenghuo.server.session import Session


#: stale entries a sweep leaves, beyond one per open connection (few cost little)
_COMPACT_FROM = 64


class TokenWatch(Deadlines):
    """The heap, ``watch(session)`` (every HELLO and REFRESH), taking the due
    out and dropping the stale are the core's :class:`Deadlines`, in C; the
    sweeps are here."""

    def __init__(self, grace: float, revocations: Revocations | None) -> None:
        self.grace = grace
        self.revocations = revocations

    @property
    def deadlines(self) -> int:
        """Entries kept, the stale ones included (``fenghuo_token_deadlines``)."""
        return len(self)

    def is_revoked(self, grants: Grants) -> bool:
        return self.revocations is not None and self.revocations.revoked(grants)

    def close_expired(self, connections: int) -> None:
        """Close the connections whose token's deadline passed (the relay's timer sweep);
        drop the stale entries once they outnumber the ``connections`` open."""
        if len(self) >= 2 * connections + _COMPACT_FROM:
            self.compact()    # O(n) once the closed (or refreshed) are as many as the open, plus 64
        now = time.time()
        while (session := self.pop_expired(now)) is not None:
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
