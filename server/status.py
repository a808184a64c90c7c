"""Per-message, per-recipient status (sent, delivered, read, escalated), from positions.

No record is kept per member per message: a recipient has read message
``seq`` of a channel iff their read cursor there is ``>= seq``, and has it on
a device iff their delivery cursor is (server/cursors.py; a device's CURSOR
sync and DELIVERED receipts move the delivery cursor, READ receipts both).
Escalations are the exception, kept per (message, recipient, step) only for
those who were escalated (server/timers.py), and so are clicks, kept per
(message, link, user) only for those who clicked (server/clicks.py).

Recipients: the other participant of a direct channel; the members of a group
who had joined before the message (its sender aside), as the group is now.
An org channel has no member list: only its counts are given.

The same computation serves the API (the relay's live positions) and
``fenghuo export --status`` (the positions the store holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TYPE_CHECKING

from fenghuo.core import ChannelKind

if TYPE_CHECKING:
    from fenghuo.core import Channel
    from fenghuo.server.clicks import Clicks
    from fenghuo.server.cursors import ReadCursors
    from fenghuo.server.relay import Relay

State = Literal["sent", "delivered", "read"]
#: what ``filter`` may ask for: every recipient, or those not yet at a state
FILTERS = ("all", "not_delivered", "not_read", "not_clicked")


@dataclass
class Progress:
    """Counters for /metrics: messages that reached a state, summed over users
    (a cursor moving from 5 to 9 counts 4), and escalations fired."""

    delivered: int = 0
    read: int = 0
    escalated: int = 0
    #: first clicks of a user on a link of a message, and every click
    clicked: int = 0
    clicks: int = 0


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    user: str
    status: State
    #: the policy steps (0-based) an escalation fired for, in order
    escalated: tuple[int, ...] = ()
    #: the links of the message this recipient followed, sorted
    clicked: tuple[str, ...] = ()


@dataclass(slots=True)
class MessageStatus:
    channel: str
    seq: int
    sender: str
    #: how many recipients (None: an org channel, whose readers are not listed)
    recipients: int | None
    delivered: int = 0
    read: int = 0
    escalated: int = 0
    #: recipients who followed at least one link
    clicked: int = 0
    #: link id -> how many recipients followed it
    links: dict[str, int] = field(default_factory=dict)
    users: list[RecipientStatus] = field(default_factory=list)
    truncated: bool = False

    def json(self) -> dict[str, Any]:
        counts = {"delivered": self.delivered, "read": self.read, "escalated": self.escalated,
                  "clicked": self.clicked}
        if self.recipients is not None:
            counts["sent"] = self.recipients - self.delivered
        return {"channel": self.channel, "seq": self.seq, "sender": self.sender,
                "recipients": self.recipients, "counts": counts, "links": self.links,
                "users": [{"user": u.user, "status": u.status, "escalated": list(u.escalated),
                           "clicked": list(u.clicked)} for u in self.users],
                "truncated": self.truncated}


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """A channel by name and kind, where no live :class:`Channel` is at hand (an export)."""

    name: str
    kind: int


class Positions(Protocol):
    """Where status is read from: the relay itself (live), or an export's load of the
    store (server/export.py)."""

    reads: ReadCursors
    delivered: ReadCursors
    clicks: Clicks


def joined(relay: Relay, ch: Channel) -> dict[str, int] | None:
    """user -> the channel's seq when they joined (0: from its start) of a direct or
    group channel; None for an org channel, which has no member list."""
    if ch.kind == ChannelKind.DIRECT_CHAT:
        return dict.fromkeys(ch.info.participants, 0)
    if ch.kind == ChannelKind.GROUP_CHAT and ch.info is not None:
        return {u: relay.memberships.get(u, {}).get(ch, 0) for u in ch.info.members}
    return None


def recipients(kind: int, members: Mapping[str, int] | None, seq: int,
               sender: str) -> list[str] | None:
    """Who message ``seq`` was for, sorted: the members (:func:`joined`) who joined
    before it, but its sender (who is the one recipient of a direct note to self)."""
    if members is None:
        return None
    others = sorted(u for u, joined in members.items() if u != sender and joined < seq)
    if not others and kind == ChannelKind.DIRECT_CHAT:
        return [sender]
    return others


def state_of(at: Positions, channel: str, user: str, seq: int) -> State:
    if at.reads.get(channel, user) >= seq:
        return "read"
    return "delivered" if at.delivered.get(channel, user) >= seq else "sent"


def message_status(at: Positions, ch: Channel | ChannelRef, members: Mapping[str, int] | None,
                   seq: int, sender: str, *, escalations: dict[str, tuple[int, ...]], wanted: str = "all",
                   limit: int | None = 1000, among: list[str] | None = None) -> MessageStatus:
    """The status of message ``seq`` of ``channel`` (sent by ``sender``) for each recipient;
    ``users`` lists those matching ``wanted`` (one of :data:`FILTERS`), at most ``limit``
    (None: all).  ``among`` names the recipients instead (an org channel's stores, say)."""
    channel = ch.name
    users = sorted(set(among)) if among is not None else recipients(ch.kind, members, seq, sender)
    clicks = at.clicks.by_user(channel, seq)
    if users is None:
        # Every cursor at or past seq, but the sender's own.
        own_read = at.reads.get(channel, sender) >= seq
        own_delivered = at.delivered.get(channel, sender) >= seq
        return MessageStatus(channel, seq, sender, None,
                             delivered=at.delivered.readers(channel, seq) - own_delivered,
                             read=at.reads.readers(channel, seq) - own_read,
                             escalated=len(escalations),
                             clicked=len(clicks.keys() - {sender}),
                             links={link: len(who.keys() - {sender}) for link, who
                                    in sorted(at.clicks.links(channel, seq).items())})
    out = MessageStatus(channel, seq, sender, len(users))
    for user in users:
        state = state_of(at, channel, user, seq)
        steps = escalations.get(user, ())
        followed = tuple(clicks.get(user, ()))
        out.read += state == "read"
        out.delivered += state != "sent"
        out.escalated += bool(steps)
        out.clicked += bool(followed)
        for link in followed:
            out.links[link] = out.links.get(link, 0) + 1
        if _excluded(wanted, state, followed):
            continue
        if len(out.users) == limit:
            out.truncated = True
            continue
        out.users.append(RecipientStatus(user, state, steps, followed))
    out.links = dict(sorted(out.links.items()))
    return out


def _excluded(wanted: str, state: State, followed: tuple[str, ...]) -> bool:
    """Is a recipient at ``state`` who followed ``followed`` left out of ``users`` by ``wanted``?"""
    if wanted == "not_read":
        return state == "read"
    if wanted == "not_delivered":
        return state != "sent"
    return wanted == "not_clicked" and bool(followed)
