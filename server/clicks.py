"""Clicks: which users followed which link of which message.

Delivered and read come from one cursor per user and channel
(server/cursors.py); a click cannot: following a link of message 7 says
nothing about message 6.  Clicks are rare (a user taps a link of a handful of
messages, not of every one), so one record per (message, link, user) is kept,
the first click only: a user tapping the same link again is counted in
``fenghuo_status_clicks_total`` but adds no record.  Stored in the ``clicks``
table and loaded at start-up; a message's clicks go with the channel's
retention only when the channel is deleted (they are a few bytes each).
"""

from __future__ import annotations

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
    #: (channel, seq) -> link -> users who followed it
    _by_message: dict[tuple[str, int], dict[str, set[str]]] = field(default_factory=dict)

    def add(self, click: Click) -> bool:
        """Record ``click``; False if that user had already followed that link."""
        users = self._by_message.setdefault((click.channel, click.seq), {}).setdefault(click.link, set())
        if click.user in users:
            return False
        users.add(click.user)
        return True

    def links(self, channel: str, seq: int) -> dict[str, set[str]]:
        """Link id -> the users who followed it, for message ``seq`` of ``channel``."""
        return self._by_message.get((channel, seq), {})

    def by_user(self, channel: str, seq: int) -> dict[str, list[str]]:
        """User -> the links of message ``seq`` they followed, sorted."""
        out: dict[str, list[str]] = {}
        for link, users in sorted(self.links(channel, seq).items()):
            for user in users:
                out.setdefault(user, []).append(link)
        return out
