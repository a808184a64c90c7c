"""Cursors: how far each user has read (or received) each channel.

The relay keeps two sets: read cursors and delivery cursors; together they
are the per-recipient status of every message (server/status.py).
One entry per user per channel, never one per message.  Per channel the
cursors are also kept sorted, so "how many members have read message s" is a
binary search, cheap for a group of 100,000.
"""

from __future__ import annotations

from bisect import bisect_left, insort


class ReadCursors:
    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, int]] = {}      # channel -> user -> seq
        self._sorted: dict[str, list[int]] = {}             # channel -> every cursor, ascending

    def get(self, channel: str, user: str) -> int:
        return self._by_user.get(channel, {}).get(user, 0)

    def advance(self, channel: str, user: str, seq: int) -> bool:
        """Move ``user``'s cursor forward to ``seq``; False if it was already there."""
        users = self._by_user.setdefault(channel, {})
        old = users.get(user, 0)
        if seq <= old:
            return False
        cursors = self._sorted.setdefault(channel, [])
        if user in users:
            del cursors[bisect_left(cursors, old)]
        users[user] = seq
        insort(cursors, seq)
        return True

    def forget(self, channel: str, user: str) -> None:
        """Drop ``user``'s cursor (they left the channel)."""
        old = self._by_user.get(channel, {}).pop(user, None)
        if old is not None:
            cursors = self._sorted[channel]
            del cursors[bisect_left(cursors, old)]

    def readers(self, channel: str, seq: int) -> int:
        """How many users have read ``channel`` up to ``seq`` or beyond."""
        cursors = self._sorted.get(channel, [])
        return len(cursors) - bisect_left(cursors, seq)
