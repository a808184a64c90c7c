"""Access checks: who may publish to, read, subscribe to or receive from a channel.

Every check parses the channel name one way (:func:`parse_or_refuse`) and
refuses one way (:func:`refuse`): the client gets ERROR, the connection
stays.  The rules (PROTOCOL §3.5, §3.8, §3.15, §5.6a):

* a direct channel is its two participants';
* a group channel is its members'; a reader (silenced by a hand-off) reads
  but does not publish;
* an org channel is whoever the token's grants allow;
* a service user acts only in groups (:func:`confine`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Callable

from fenghuo.channels import GROUP_PREFIX, ChannelName, InvalidChannel, parse_channel
from fenghuo.core import Channel, ChannelKind, ErrorCode, Hub, ProtocolError
if TYPE_CHECKING:
    from fenghuo.server.groups import GroupRegistry
    from fenghuo.server.session import Session


def refuse(code: int, message: str) -> ProtocolError:
    """A non-fatal protocol error: the client gets ERROR, the connection stays."""
    return ProtocolError(code, message, False)


def parse_or_refuse(name: str | bytes) -> ChannelName:
    """The channel named ``name`` (UTF-8 when bytes), or ERROR ``INVALID_CHANNEL``."""
    try:
        return parse_channel(name.decode("utf-8") if isinstance(name, bytes) else name)
    except UnicodeDecodeError:
        # Not the codec's text: it would quote the client's bytes.
        raise refuse(ErrorCode.INVALID_CHANNEL, "channel name is not valid UTF-8") from None
    except InvalidChannel as exc:
        raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None


def confine(session: Session, kind: int, name: str) -> None:
    """A service user publishes and reads only in groups (PROTOCOL §5.6a)."""
    if kind != ChannelKind.GROUP_CHAT and session.grants.is_service:
        raise refuse(ErrorCode.FORBIDDEN, f"a service user acts only in the conversations "
                     f"(groups) it belongs to, not in {name!r}")


class Access:
    """The one place a session's request on a channel is allowed or refused."""

    def __init__(self, hub: Hub, groups: GroupRegistry,
                 ensure_channel: Callable[[str], Channel],
                 direct_to_read: Callable[[str], Channel | None]) -> None:
        self.hub = hub
        self.groups = groups
        #: the channel by name, a direct one's participants made members (Subscriptions)
        self.ensure_channel = ensure_channel
        #: a direct chat to read, None if it has had no message (Relay.direct_to_read)
        self.direct_to_read = direct_to_read

    def publish_channel(self, session: Session, raw: bytes) -> Channel:
        """The channel ``session`` may publish to under the name ``raw``, or a refusal.

        A direct chat is made (its participants joined) here: call it only for a
        publish that nothing refuses after this check (PROTOCOL §5.1)."""
        cn = self.may_publish(session, raw)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            return self.ensure_channel(cn.name)
        return self.hub.channel(cn.name, cn.kind)

    def may_publish(self, session: Session, raw: bytes) -> ChannelName:
        """The name ``raw`` parsed if ``session`` may publish there now, or a refusal;
        makes nothing (a SCHEDULE's check: a refused or cancelled one leaves no
        direct chat behind, §3.17a)."""
        cn = parse_or_refuse(raw)
        confine(session, cn.kind, cn.name)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            if session.user not in cn.participants:
                raise refuse(ErrorCode.FORBIDDEN, f"{session.user!r} is not in {cn.name!r}")
        elif cn.kind == ChannelKind.GROUP_CHAT:
            group = self.groups.member_group(session.user, cn.group)
            if group.is_reader(session.user):
                raise refuse(ErrorCode.FORBIDDEN, f"{session.user!r} is a reader of {cn.name!r} "
                             "(silenced by a hand-off or by the owner's role): it may not "
                             "publish there")
        elif not session.grants.can_publish(cn.name):
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to publish to {cn.name!r}")
        return cn

    def history_channel(self, session: Session, name: str) -> Channel | None:
        """The channel ``name`` if ``session`` may read its history; None for a
        direct chat that has had no message (its page is empty).

        Membership, not the time of joining, decides: an advisor added to a
        conversation reads it from the start.
        """
        cn = parse_or_refuse(name)
        confine(session, cn.kind, name)
        if cn.kind == ChannelKind.DIRECT_CHAT:
            allowed = session.user in cn.participants
        elif cn.kind == ChannelKind.GROUP_CHAT:
            group = self.groups.groups.get(cn.group)
            allowed = group is not None and session.user in group.members
        else:
            allowed = session.grants.can_subscribe(name)
        if not allowed:
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to read {name!r}")
        if cn.kind == ChannelKind.DIRECT_CHAT:
            # Not made here as a first publish makes it (PROTOCOL §5.1, §3.17).
            return self.direct_to_read(name)
        return self.hub.channel(name, cn.kind)

    def subscribable(self, session: Session, name: str) -> ChannelName:
        """The channel ``name`` if SUBSCRIBE may name it: an org channel the grants
        allow, or (checked by :meth:`readable`) a channel ``session`` receives already."""
        cn = parse_or_refuse(name)
        if cn.kind == ChannelKind.ORG_UNIT and not session.grants.can_subscribe(name):
            raise refuse(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {name!r}")
        return cn

    def readable(self, session: Session, name: str) -> Channel:
        """The existing channel ``name`` if ``session`` may read it (it receives it).

        A group's also asks the group: a leaver's session receives the channel
        until its leave event has gone out (Subscriptions.part), and must be
        refused from the change on, as PUBLISH and HISTORY are.
        """
        ch = self.hub.find(name)
        if ch is None:
            parse_or_refuse(name)   # a name outside the grammar: INVALID_CHANNEL, as PUBLISH
        if ch is None or ch not in session.subscriptions or (
                ch.kind == ChannelKind.GROUP_CHAT and not self.in_group(session.user, name)):
            raise refuse(ErrorCode.FORBIDDEN, f"not subscribed to {name!r}")
        return ch

    def in_group(self, user: str, name: str) -> bool:
        """Whether ``user`` is a member of the group whose channel is ``name``, here."""
        group = self.groups.groups.get(name[len(GROUP_PREFIX):])
        return group is not None and user in group.members
