"""Groups: members and roles (owner, admin, member, reader), and the rules of changing them.

A ``reader`` receives the group and reads its history but may not publish: a
bot silenced by a hand-off.  A group may wait in the queue of conversations
for an advisor (``Group.queued``); the queue is every group's replica on
every worker, so any worker can say which one waited longest.

Pure state and rules, no I/O: :class:`fenghuo.server.relay.Relay` applies the
results (subscriptions, join/leave events in the group channel).  Arguments
come from requests that fit their schema (:mod:`fenghuo.server.schemas`):
user ids are valid, roles are ones the op allows.
"""

from __future__ import annotations

import secrets
from typing import Any
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fenghuo.channels import group_channel, InvalidChannel
from fenghuo.core import ErrorCode
from fenghuo.server.access import refuse

OWNER, ADMIN, MEMBER, READER = "owner", "admin", "member", "reader"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks for a GROUP op, with what their token allows beyond membership
    (PROTOCOL §5.6a): carried to the group's owning worker with the request."""

    user: str
    #: a service user (a bot): only the ops of its own conversations
    service: bool = False
    #: may take a conversation waiting for an advisor
    advisor: bool = False


@dataclass(frozen=True, slots=True)
class Waiting:
    """A conversation in the queue for an advisor: what taking it will do."""

    at_us: int
    by: str
    note: str = ""
    remove: tuple[str, ...] = ()
    silence: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"at_us": self.at_us, "by": self.by, "note": self.note,
                "remove": list(self.remove), "silence": list(self.silence)}

    @classmethod
    def of(cls, record: dict[str, Any]) -> Waiting:
        return cls(record["at_us"], record["by"], record.get("note", ""),
                   tuple(record.get("remove", ())), tuple(record.get("silence", ())))


@dataclass(slots=True)
class Group:
    id: str
    owner: str
    title: str = ""
    members: dict[str, str] = field(default_factory=dict)   # user -> role
    #: in the queue for an advisor since (None: not waiting)
    queued: Waiting | None = None
    #: changes so far, and the id of the last one (made at random): a cluster
    #: writes a change only over the very record it was made from
    version: int = 0
    change: str = ""

    @property
    def channel(self) -> str:
        return group_channel(self.id)

    def role_of(self, user: str) -> str | None:
        return self.members.get(user)

    def is_reader(self, user: str) -> bool:
        """Silenced by a hand-off: ``user`` reads the conversation and may not publish."""
        return self.members.get(user) == READER

    def record(self) -> dict[str, Any]:
        """What the store keeps of the group."""
        record = {"id": self.id, "owner": self.owner, "title": self.title,
                  "members": dict(self.members), "version": self.version, "change": self.change}
        if self.queued is not None:
            record["queued"] = self.queued.record()
        return record

    def changed(self) -> str:
        """Count a change made here; the id of the change it was made over."""
        after, self.change = self.change, secrets.token_hex(8)
        self.version += 1
        return after

    def newer_than(self, record: dict[str, Any]) -> bool:
        """Whether this group already is ``record``, or a later change of this node's.

        Two nodes may make a change of the same version over the same record
        (the group's bucket keeps one of them): the other one is taken.
        """
        return bool(self.change == record.get("change", "")
                    or self.version > record.get("version", 0))

    def describe(self) -> dict[str, Any]:
        return {"group": self.id, "channel": self.channel, "title": self.title,
                "owner": self.owner, "members": len(self.members)}


#: a change about to be made: the group as it is (not yet registered, on create)
#: and, made when asked, the group as the change would leave it; raises to
#: refuse the change, before anything is changed
Admit = Callable[[Group, Callable[[], Group]], None]


class GroupRegistry:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.by_user: dict[str, set[str]] = {}
        #: asked before every change of a group's record (here: create, add,
        #: role; server/group_ops.py: handoff, take, queue), nothing changed
        #: yet (a cluster refuses a group too large for its engine: GroupOps.admit)
        self.admit: Admit = lambda group, after: None

    def _get(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            raise refuse(ErrorCode.NOT_FOUND, f"no group {group_id!r}")
        return group

    def _manager(self, actor: str, group_id: str) -> Group:
        group = self._get(group_id)
        if group.role_of(actor) not in (OWNER, ADMIN):
            raise refuse(ErrorCode.FORBIDDEN, "only the owner or an admin may change members")
        return group

    def member_group(self, actor: str, group_id: str) -> Group:
        group = self._get(group_id)
        if actor not in group.members:
            raise refuse(ErrorCode.FORBIDDEN, f"not a member of {group_id!r}")
        return group

    def join(self, group: Group, user: str, role: str) -> None:
        group.members[user] = role
        self.by_user.setdefault(user, set()).add(group.id)

    def part(self, group: Group, user: str) -> None:
        del group.members[user]
        ids = self.by_user.get(user)
        if ids is not None:
            ids.discard(group.id)
            if not ids:
                del self.by_user[user]

    def create(self, actor: str, group_id: str, members: list[str] | tuple[str, ...] = (),
               title: str = "") -> Group:
        try:
            group_channel(group_id)
        except InvalidChannel as exc:
            raise refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
        if group_id in self.groups:
            raise refuse(ErrorCode.CONFLICT, f"group {group_id!r} exists")
        group = Group(group_id, actor, title[:200])
        joining = {actor: OWNER, **{u: MEMBER for u in members if u != actor}}
        self.admit(group, lambda: replace(group, members=joining))
        self.groups[group_id] = group
        for user, role in joining.items():
            self.join(group, user, role)
        return group

    def add(self, actor: str, group_id: str, users: list[str], role: str = MEMBER) -> list[str]:
        group = self._manager(actor, group_id)
        if role == ADMIN and group.role_of(actor) != OWNER:
            raise refuse(ErrorCode.FORBIDDEN, "only the owner may appoint admins")
        added = [u for u in dict.fromkeys(users) if u not in group.members]
        self.admit(group, lambda: replace(group, members={**group.members,
                                                          **dict.fromkeys(added, role)}))
        for user in added:
            self.join(group, user, role)
        return added

    def remove(self, actor: str, group_id: str, users: list[str]) -> list[str]:
        group = self._manager(actor, group_id)
        targets = self._removable(group, actor, users, "removed")
        for user in targets:
            self.part(group, user)
        return targets

    @staticmethod
    def _removable(group: Group, actor: str, users: list[str] | tuple[str, ...],
                   what: str) -> list[str]:
        """The members of ``users`` that ``actor`` (owner or admin) may take out (remove
        or silence); FORBIDDEN for the owner, and for an admin unless ``actor`` owns it."""
        targets = [u for u in dict.fromkeys(users) if u in group.members]
        for user in targets:
            if group.members[user] == OWNER:
                raise refuse(ErrorCode.FORBIDDEN, f"the owner cannot be {what}")
            if group.members[user] == ADMIN and group.role_of(actor) != OWNER:
                raise refuse(ErrorCode.FORBIDDEN, f"only the owner may have an admin {what}")
        return targets

    def hands_off(self, actor: Actor, group_id: str, remove: list[str] | tuple[str, ...],
                  silence: list[str] | tuple[str, ...]) -> Group:
        """The group, if ``actor`` may hand it off or queue it, taking ``remove`` and
        ``silence`` out of the conversation: its owner or an admin (the rules of
        ``remove``), or a service user that belongs to it and takes out only itself."""
        if actor.service:
            group = self.member_group(actor.user, group_id)
            if any(u != actor.user for u in (*remove, *silence)):
                raise refuse(ErrorCode.FORBIDDEN, "a service user may remove or silence only itself")
            return group
        group = self._manager(actor.user, group_id)
        self._removable(group, actor.user, remove, "removed")
        self._removable(group, actor.user, silence, "silenced")
        return group

    def silence(self, group: Group, users: list[str] | tuple[str, ...]) -> list[str]:
        """Make ``users`` (members, checked by :meth:`hands_off`) readers; those that were not."""
        silenced = [u for u in dict.fromkeys(users) if group.members.get(u) not in (None, READER)]
        for user in silenced:
            group.members[user] = READER
        return silenced

    def waiting(self) -> list[Group]:
        """The groups in the queue for an advisor, longest waiting first."""
        return sorted((g for g in self.groups.values() if g.queued is not None),
                      key=lambda g: (g.queued.at_us, g.id))   # type: ignore[union-attr]

    def leave(self, actor: str, group_id: str) -> None:
        group = self.member_group(actor, group_id)
        if group.owner == actor:
            raise refuse(ErrorCode.CONFLICT, "the owner cannot leave; hand ownership over first")
        self.part(group, actor)

    def set_role(self, actor: str, group_id: str, user: str, role: str) -> None:
        group = self._get(group_id)
        if group.role_of(actor) != OWNER:
            raise refuse(ErrorCode.FORBIDDEN, "only the owner may change roles")
        if user not in group.members:
            raise refuse(ErrorCode.NOT_FOUND, f"{user!r} is not a member")
        if role != OWNER and user == actor:
            raise refuse(ErrorCode.MALFORMED_BODY,
                          "the owner changes its own role only by handing ownership over")
        changes = {**({actor: ADMIN} if role == OWNER else {}), user: role}
        owner = user if role == OWNER else group.owner
        self.admit(group, lambda: replace(group, owner=owner,
                                          members={**group.members, **changes}))
        group.owner = owner
        group.members.update(changes)

    def restore(self, record: dict[str, Any]) -> Group:
        """Re-create a group from :meth:`Group.record` (at start-up)."""
        group = Group(record["id"], record["owner"], record.get("title", ""),
                      version=record.get("version", 0), change=record.get("change", ""))
        if record.get("queued"):
            group.queued = Waiting.of(record["queued"])
        self.groups[group.id] = group
        for user, role in record["members"].items():
            self.join(group, user, role)
        return group

    def replace(self, record: dict[str, Any]) -> tuple[Group, list[str], list[str]]:
        """Take ``record`` as the group's new state (from its owning worker):
        the group, the users added and the users removed."""
        old = self.groups.get(record["id"])
        before = dict(old.members) if old is not None else {}
        if old is not None:
            for user in before:
                self.part(old, user)
        group = self.restore(record)
        return (group, [u for u in group.members if u not in before],
                [u for u in before if u not in group.members])

    def of_user(self, user: str) -> list[Group]:
        return [self.groups[g] for g in sorted(self.by_user.get(user, ()))]
