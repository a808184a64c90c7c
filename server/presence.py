"""Presence: who is online (here and on the other workers or nodes), who may see it,
and the PRESENCE events of the sessions that watch a user (PROTOCOL §3.17)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from collections.abc import Iterable

from fenghuo.core import FrameType
from fenghuo.protocol import encode_json
from fenghuo.server.devices import SERVICE_DEVICE
from fenghuo.server.outbox import WebhookEvent
from fenghuo.tokens import Grants

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session


class Presence:
    """Presence for the sessions of one relay; devices are counted in ``relay.users``."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        #: user id -> sessions here watching that user's presence
        self.watchers: dict[str, set[Session]] = {}

    def of(self, user: str) -> dict[str, Any]:
        """Whether ``user`` is online, and on how many devices, counting every worker."""
        devices = self.relay.users.count(user)
        if self.relay.cluster is not None:
            devices += self.relay.cluster.remote_presence(user)
        return {"online": devices > 0, "devices": devices}

    def shares_channel(self, user: str, other: str) -> bool:
        """Do ``user`` and ``other`` both belong to a direct or group channel?"""
        memberships = self.relay.memberships
        mine, theirs = memberships.get(user, {}), memberships.get(other, {})
        if len(theirs) < len(mine):
            mine, theirs = theirs, mine
        return any(ch in theirs for ch in mine)

    def sees(self, grants: Grants, user: str) -> bool:
        """PROTOCOL §3.17: oneself, users sharing a channel, or anyone with the ``presence`` claim."""
        return grants.sees_all_presence or grants.user == user or self.shares_channel(grants.user, user)

    def visible(self, grants: Grants, user: str) -> dict[str, Any]:
        if self.sees(grants, user):
            return self.of(user)
        return {"online": False, "devices": 0, "hidden": True}

    def watch(self, session: Session, users: Iterable[str]) -> None:
        if session.watching is None:
            session.watching = set()
        for user in users:
            self.watchers.setdefault(user, set()).add(session)
            session.watching.add(user)

    def unwatch(self, session: Session, users: Iterable[str]) -> None:
        for user in users:
            self.watchers.get(user, set()).discard(session)
            if session.watching is not None:
                session.watching.discard(user)

    def forget(self, session: Session) -> None:
        """``session`` closed: it watches no one any more."""
        for user in session.watching or ():
            watchers = self.watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self.watchers[user]

    def changed(self, user: str) -> None:
        """``user``'s devices changed: tell the sessions here that watch them."""
        watchers = self.watchers.get(user)
        if not watchers:
            return
        frame = encode_json(FrameType.PRESENCE_EVENT, {"user": user, **self.of(user)})
        for session in watchers:
            # Checked at each event: a watch outlives the shared channel that allowed it.
            if self.sees(session.grants, user):
                session.send(frame)

    def came_or_went(self, session: Session) -> None:
        """``session``'s device came or went here: PRESENCE to the sessions here that
        watch its user, and presence.changed to the webhooks (this worker's alone).

        One call for both, each tested before any other call: with no watcher and
        no webhook, what nearly every connect and close meets, it is one frame."""
        user = session.user
        if user in self.watchers:
            self.changed(user)
        if session.device != SERVICE_DEVICE and self.relay.endpoints:
            self.relay.emit(WebhookEvent("presence.changed", "", {"user": user, **self.of(user)},
                                         stream=f"user:{user}"))
