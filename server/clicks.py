"""Clicks: which users followed which link of which message.

Delivered and read come from one cursor per user and channel
(server/cursors.py); a click cannot: following a link of message 7 says
nothing about message 6.  Clicks are rare (a user taps a link of a handful of
messages, not of every one), so one record per (message, link, user) is kept,
the first click only: a user tapping the same link again is counted in
``fenghuo_status_clicks_total`` but adds no record.  Stored in the ``clicks``
table and loaded at start-up.  Retention (server/retention.py) applies to
them as to messages: the store deletes a message's clicks with the message
(and any left of a message already gone); in memory, where message times are
not kept, a click is dropped once it is itself older than its channel's
retention age (its message, older still, is gone by then and its status
answers NOT_FOUND).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: longest link id of a CLICKED receipt, in bytes: ids are names the app
#: gives its links ("pay", "offer-3"), not URLs; short keeps a click row small
LINK_MAX = 64


@dataclass(frozen=True, slots=True)
class Click:
    """One user's first click on one link of one message."""

    channel: str
    seq: int
    link: str
    user: str
    ts_us: int


@dataclass(slots=True)
class Clicks:
    #: (channel, seq) -> link -> user who followed it -> when (ts_us of the first click)
    _by_message: dict[tuple[str, int], dict[str, dict[str, int]]] = field(default_factory=dict)

    def add(self, click: Click) -> bool:
        """Record ``click``; False if that user had already followed that link."""
        users = self._by_message.setdefault((click.channel, click.seq), {}).setdefault(click.link, {})
        if click.user in users:
            return False
        users[click.user] = click.ts_us
        return True

    def links(self, channel: str, seq: int) -> dict[str, dict[str, int]]:
        """Link id -> the users who followed it (and when), for message ``seq`` of ``channel``."""
        return self._by_message.get((channel, seq), {})

    def expire(self, cutoff_us: Callable[[str], int | None]) -> int:
        """Drop the clicks older than ``cutoff_us(channel)`` (None: kept); how many went."""
        dropped = 0
        for key in list(self._by_message):
            cutoff = cutoff_us(key[0])
            if cutoff is None:
                continue
            links = self._by_message[key]
            for link in list(links):
                users = links[link]
                old = [user for user, ts_us in users.items() if ts_us < cutoff]
                for user in old:
                    del users[user]
                dropped += len(old)
                if not users:
                    del links[link]
            if not links:
                del self._by_message[key]
        return dropped

    def by_user(self, channel: str, seq: int) -> dict[str, list[str]]:
        """User -> the links of message ``seq`` they followed, sorted."""
        out: dict[str, list[str]] = {}
        for link, users in sorted(self.links(channel, seq).items()):
            for user in users:
                out.setdefault(user, []).append(link)
        return out
