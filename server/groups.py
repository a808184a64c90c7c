"""Groups: members and roles (owner, admin, member), and the rules of changing them.

Pure state and rules, no I/O: :class:`fenghuo.server.relay.Relay` applies the
results (subscriptions, join/leave events in the group channel).  Arguments
come from requests that fit their schema (:mod:`fenghuo.server.schemas`):
user ids are valid, roles are ones the op allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fenghuo.channels import group_channel, InvalidChannel
from fenghuo.core import ErrorCode, ProtocolError

OWNER, ADMIN, MEMBER = "owner", "admin", "member"


def _refuse(code: int, message: str) -> ProtocolError:
    return ProtocolError(code, message, False)


@dataclass(slots=True)
class Group:
    id: str
    owner: str
    title: str = ""
    members: dict[str, str] = field(default_factory=dict)   # user -> role

    @property
    def channel(self) -> str:
        return group_channel(self.id)

    def role_of(self, user: str) -> str | None:
        return self.members.get(user)

    def record(self) -> dict:
        """What the store keeps of the group."""
        return {"id": self.id, "owner": self.owner, "title": self.title, "members": self.members}

    def describe(self) -> dict:
        return {"group": self.id, "channel": self.channel, "title": self.title,
                "owner": self.owner, "members": len(self.members)}


class GroupRegistry:
    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.by_user: dict[str, set[str]] = {}

    def _get(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            raise _refuse(ErrorCode.NOT_FOUND, f"no group {group_id!r}")
        return group

    def _manager(self, actor: str, group_id: str) -> Group:
        group = self._get(group_id)
        if group.role_of(actor) not in (OWNER, ADMIN):
            raise _refuse(ErrorCode.FORBIDDEN, "only the owner or an admin may change members")
        return group

    def member_group(self, actor: str, group_id: str) -> Group:
        group = self._get(group_id)
        if actor not in group.members:
            raise _refuse(ErrorCode.FORBIDDEN, f"not a member of {group_id!r}")
        return group

    def _join(self, group: Group, user: str, role: str) -> None:
        group.members[user] = role
        self.by_user.setdefault(user, set()).add(group.id)

    def _part(self, group: Group, user: str) -> None:
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
            raise _refuse(ErrorCode.INVALID_CHANNEL, str(exc)) from None
        if group_id in self.groups:
            raise _refuse(ErrorCode.CONFLICT, f"group {group_id!r} exists")
        group = Group(group_id, actor, title[:200])
        self.groups[group_id] = group
        self._join(group, actor, OWNER)
        for user in dict.fromkeys(members):
            if user != actor:
                self._join(group, user, MEMBER)
        return group

    def add(self, actor: str, group_id: str, users: list[str], role: str = MEMBER) -> list[str]:
        group = self._manager(actor, group_id)
        if role == ADMIN and group.role_of(actor) != OWNER:
            raise _refuse(ErrorCode.FORBIDDEN, "only the owner may appoint admins")
        added = [u for u in dict.fromkeys(users) if u not in group.members]
        for user in added:
            self._join(group, user, role)
        return added

    def remove(self, actor: str, group_id: str, users: list[str]) -> list[str]:
        group = self._manager(actor, group_id)
        targets = [u for u in dict.fromkeys(users) if u in group.members]
        for user in targets:
            if group.members[user] == OWNER:
                raise _refuse(ErrorCode.FORBIDDEN, "the owner cannot be removed")
            if group.members[user] == ADMIN and group.role_of(actor) != OWNER:
                raise _refuse(ErrorCode.FORBIDDEN, "only the owner may remove an admin")
        for user in targets:
            self._part(group, user)
        return targets

    def leave(self, actor: str, group_id: str) -> None:
        group = self.member_group(actor, group_id)
        if group.owner == actor:
            raise _refuse(ErrorCode.CONFLICT, "the owner cannot leave; hand ownership over first")
        self._part(group, actor)

    def set_role(self, actor: str, group_id: str, user: str, role: str) -> None:
        group = self._get(group_id)
        if group.role_of(actor) != OWNER:
            raise _refuse(ErrorCode.FORBIDDEN, "only the owner may change roles")
        if user not in group.members:
            raise _refuse(ErrorCode.NOT_FOUND, f"{user!r} is not a member")
        if role == OWNER:
            group.members[actor] = ADMIN
            group.owner = user
        elif user == actor:
            raise _refuse(ErrorCode.MALFORMED_BODY,
                          "the owner changes its own role only by handing ownership over")
        group.members[user] = role

    def restore(self, record: dict) -> Group:
        """Re-create a group from :meth:`Group.record` (at start-up)."""
        group = Group(record["id"], record["owner"], record.get("title", ""))
        self.groups[group.id] = group
        for user, role in record["members"].items():
            self._join(group, user, role)
        return group

    def replace(self, record: dict) -> tuple[Group, list[str], list[str]]:
        """Take ``record`` as the group's new state (from its owning worker):
        the group, the users added and the users removed."""
        old = self.groups.get(record["id"])
        before = dict(old.members) if old is not None else {}
        if old is not None:
            for user in before:
                self._part(old, user)
        group = self.restore(record)
        return (group, [u for u in group.members if u not in before],
                [u for u in before if u not in group.members])

    def of_user(self, user: str) -> list[Group]:
        return [self.groups[g] for g in sorted(self.by_user.get(user, ()))]
