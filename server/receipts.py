"""Receipts: delivered and read cursors, clicks, unread counts (PROTOCOL §3.9, §3.13).

The cursors themselves are kept in ``relay.reads`` and ``relay.delivered``
(:class:`~fenghuo.server.cursors.ReadCursors`, which the other workers and
nodes also advance) and the clicks in ``relay.clicks``; this module moves
them for the users here, keeps them in the store, shares them, and tells a
message's sender.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fenghuo.core import Channel, ChannelKind, ErrorCode, ReceiptKind, encode_receipt_event
from fenghuo.server.access import refuse
from fenghuo.server.clicks import Click
from fenghuo.server.frames import message_sender
from fenghuo.server.outbox import WebhookEvent

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay


class Receipts:
    """Receipts, cursors and clicks for the users of one relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def receipt(self, user: str, ch: Channel, seq: int, kind: int, answer: bool) -> dict[str, Any]:
        """``user`` received or read ``seq`` of ``ch``: move the read cursor, tell the sender."""
        if not 1 <= seq <= ch.seq:
            # No such message (not yet sequenced, or 0): refused, so nothing moves (§3.11 step 4).
            if answer:
                raise refuse(ErrorCode.NOT_FOUND, f"no message {seq} in {ch.name!r}")
            return {}
        if kind == ReceiptKind.READ:
            # Reading is per user, whatever the device: every device's unread count follows.
            self.mark_read(user, ch, seq)
        else:
            self.mark_delivered(user, {ch.name: min(seq, ch.seq)})
        self.relay.emit(WebhookEvent("message.read" if kind == ReceiptKind.READ else "message.delivered",
                                     ch.name, {"channel": ch.name, "seq": seq, "user": user}))
        forwarded = 0
        try:
            frame = ch.ring[seq]
        except KeyError:
            if answer:
                raise refuse(ErrorCode.NOT_FOUND, f"seq {seq} is not held for {ch.name!r}") from None
            return {}
        sender = message_sender(frame)
        if sender != user:
            forwarded = self.relay.send_to_user(sender, encode_receipt_event(ch.name, seq, kind, user))
        return {"channel": ch.name, "seq": seq, "forwarded": forwarded}

    def click(self, user: str, ch: Channel, seq: int, link: str) -> dict[str, Any]:
        """``user`` followed link ``link`` of message ``seq`` of ``ch``: count it, keep the
        first click of each user on each link, and tell the webhooks about that one."""
        if not 1 <= seq <= ch.seq:
            raise refuse(ErrorCode.NOT_FOUND, f"no message {seq} in {ch.name!r}")
        self.relay.progress.clicks += 1
        click = Click(ch.name, seq, link, user, time.time_ns() // 1000)
        first = self.relay.clicks.add(click)
        if first:
            self.relay.progress.clicked += 1
            if self.relay.store is not None:
                self.relay.store.save_click(click)
            self.relay.emit(WebhookEvent("message.clicked", ch.name,
                                         {"channel": ch.name, "seq": seq, "user": user, "link": link}))
            if self.relay.cluster is not None:
                self.relay.cluster.share("click", channel=ch.name, seq=seq, link=link, user=user,
                                         ts_us=click.ts_us)
        return {"channel": ch.name, "seq": seq, "link": link, "first": first}

    def mark_read(self, user: str, ch: Channel, seq: int) -> None:
        """Advance ``user``'s read cursor of ``ch`` (never past its head), and keep it."""
        seq = min(seq, ch.seq)
        old = self.relay.reads.get(ch.name, user)
        if self.relay.reads.advance(ch.name, user, seq):
            self.relay.progress.read += seq - old
            # What was read has arrived: the other workers advance both on "read".
            self._advance_delivered(ch.name, user, seq)
            if self.relay.store is not None:
                self.relay.store.save_read_cursor(ch.name, user, seq)
            if self.relay.cluster is not None:
                self.relay.cluster.share("read", channel=ch.name, user=user, seq=seq)

    def mark_delivered(self, user: str, positions: dict[str, int]) -> None:
        """``user``'s devices have received these channels up to these seqs (capped at
        the heads by the caller): advance the delivery cursors, keep and share them."""
        moved = {name: seq for name, seq in positions.items()
                 if self._advance_delivered(name, user, seq)}
        if moved and self.relay.cluster is not None:
            self.relay.cluster.share("delivered", user=user, positions=moved)

    def _advance_delivered(self, name: str, user: str, seq: int) -> bool:
        old = self.relay.delivered.get(name, user)
        if not self.relay.delivered.advance(name, user, seq):
            return False
        self.relay.progress.delivered += seq - old
        if self.relay.store is not None:
            self.relay.store.save_delivered_cursor(name, user, seq)
        return True

    def unread(self, user: str, ch: Channel) -> int:
        """Messages of ``ch`` after both ``user``'s read cursor and their joining."""
        start = max(self.relay.reads.get(ch.name, user), self.relay.memberships.get(user, {}).get(ch, 0))
        return max(0, ch.seq - start)

    def members_of(self, ch: Channel) -> int | None:
        """How many users belong to a direct or group channel (None for org channels)."""
        if ch.kind == ChannelKind.DIRECT_CHAT:
            return 2
        if ch.kind == ChannelKind.GROUP_CHAT and ch.info is not None:
            return len(ch.info.members)
        return None
