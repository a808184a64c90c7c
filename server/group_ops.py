"""GROUP requests (PROTOCOL §3.16, §3.16a, §5.6a) over the registry of server/groups.py:
who may do what to a group, the events each change puts in the group's channel,
the members it subscribes and unsubscribes, and keeping and sharing the change.

Under several workers or nodes a change is made where the group's channel is
sequenced; the others apply the record it made (:meth:`GroupOps.apply`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

import orjson

from fenghuo.channels import GROUP_PREFIX
from fenghuo.core import ChannelKind, ContentType, ErrorCode, FrameType, encode_error
from fenghuo.protocol import encode_json
from fenghuo.server.access import refuse
from fenghuo.server.groups import MEMBER, READER, Actor, Group, GroupRegistry, Waiting
from fenghuo.server.schemas import (
    GroupAdd,
    GroupCreate,
    GroupHandoff,
    GroupLeave,
    GroupList,
    GroupMembers,
    GroupQueue,
    GroupRemove,
    GroupRequest,
    GroupRole,
    GroupTake,
)

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay

#: what a service user may ask of GROUP (PROTOCOL §5.6a): nothing that makes groups or
#: changes who is in one, beyond taking itself out by a hand-off
SERVICE_GROUP_OPS = (GroupLeave, GroupList, GroupMembers, GroupHandoff, GroupQueue)

GROUP_CHANGED_ELSEWHERE = ("the group was changed through another node meanwhile, and this "
                           "change was not made; retry")
#: a request's RESULT or ERROR for its request id, decided once what it
#: changed is stored (server/cluster.py, _serve)
Answer = Callable[[int], bytes]


class GroupOps:
    """The GROUP requests of one relay's users, and the records of other workers' changes."""

    def __init__(self, relay: Relay, registry: GroupRegistry) -> None:
        self.relay = relay
        self.registry = registry
        registry.admit = self.admit
        # The writes of the GROUP request being run (request), in a cluster.
        self._writes: list[asyncio.Future[bool]] | None = None

    def run(self, actor: Actor, request: GroupRequest) -> dict[str, Any]:
        """Run one GROUP request of ``actor``; the RESULT body."""
        groups = self.registry
        me = actor.user
        if actor.service and not isinstance(request, SERVICE_GROUP_OPS):
            raise refuse(ErrorCode.FORBIDDEN, "a service user acts only in the conversations it "
                         "belongs to: GROUP ops leave, list, members, handoff and queue")
        match request:
            case GroupCreate(group=group_id, members=members, title=title):
                # A title is user text too: masked as a note is, before anything keeps it.
                # The rule is looked up by the channel's name alone; the id itself is
                # checked by create (INVALID_CHANNEL), not here (group_channel would
                # raise a bare InvalidChannel: 'internal error', test_adversity).
                group = groups.create(me, group_id, members or [],
                                      self.masked_text(GROUP_PREFIX + group_id, title or ""))
                ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
                ch.info = group
                for user in group.members:
                    self.relay.subs.join(user, ch)
                self.save(group)
                self.event(group, {"event": "created", "by": me,
                                         "users": list(group.members)})
                return {**group.describe(), "seq": ch.seq}
            case GroupAdd(group=group_id, users=users, role=role):
                # Absent and null mean "member" (PROTOCOL §2.5): the event says so too.
                given = role or MEMBER
                added = groups.add(me, group_id, users, given)
                group = groups.groups[group_id]
                ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
                for user in added:
                    self.relay.subs.join(user, ch)
                self.save(group)
                if added:
                    self.event(group, {"event": "join", "by": me, "users": added,
                                             "role": given})
                return {"group": group_id, "added": added}
            case GroupLeave(group=group_id):
                group = groups.member_group(me, group_id)
                groups.leave(me, group_id)
                self._announce_parting(me, group, [me])
                return {"group": group_id, "removed": [me]}
            case GroupRemove(group=group_id, users=users):
                removed = groups.remove(me, group_id, users)
                self._announce_parting(me, groups.groups[group_id], removed)
                return {"group": group_id, "removed": removed}
            case GroupRole(group=group_id, user=user, role=role):
                groups.set_role(me, group_id, user, role)
                self.relay.forget_publish(user)
                group = groups.groups[group_id]
                self.save(group)
                self.event(group, {"event": "role", "by": me, "user": user, "role": role})
                return {"group": group_id, "user": user, "role": role}
            case GroupHandoff(group=group_id, to=to, remove=remove, silence=silence, note=note):
                remove, silence = remove or [], silence or []
                if to in remove or to in silence:
                    raise refuse(ErrorCode.MALFORMED_BODY, "handoff: 'to' is also in 'remove' or 'silence'")
                group = groups.hands_off(actor, group_id, remove, silence)
                return self._hand_over(me, group, to, remove, silence, note or "")
            case GroupQueue(group=group_id, remove=remove, silence=silence, note=note):
                return self._queue(actor, group_id, remove or [], silence or [], note or "")
            case GroupTake(group=group_id):
                return self._take(actor, group_id)
            case GroupList():
                return {"groups": [{**g.describe(), "role": g.members[me]}
                                   for g in groups.of_user(me)]}
            case GroupMembers(group=group_id):
                return {"group": group_id, "members": groups.member_group(me, group_id).members}
        raise AssertionError(f"no GROUP op for {request!r}")   # the schema admits no other

    def _hand_over(self, me: str, group: Group, to: str, remove: list[str] | tuple[str, ...],
                   silence: list[str] | tuple[str, ...], note: str) -> dict[str, Any]:
        """Hand a conversation over to ``to`` (a bot to an advisor, PROTOCOL §3.16), the
        request allowed (:meth:`GroupRegistry.hands_off`, or a waiting one taken): add them,
        make ``silence`` readers, say so in the stream, then remove ``remove``.  ``to`` is
        a member from here on and reads the conversation from seq 1 with HISTORY."""
        self.admit(group, lambda: self._handed_over(group, to, silence))
        ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        note = self.masked_text(group.channel, note)
        added = to not in group.members
        if added:
            self.registry.join(group, to, MEMBER)
            self.relay.subs.join(to, ch)
        elif group.members[to] == READER:
            group.members[to] = MEMBER     # a silenced member handed the conversation speaks again
        silenced = self.registry.silence(group, silence)
        for user in silenced:
            self.relay.forget_publish(user)
        group.queued = None                # handed off: no longer waiting for an advisor
        self.save(group)                   # ahead of its events (save)
        if added:
            self.event(group, {"event": "join", "by": me, "users": [to], "role": MEMBER})
        self.event(group, {"event": "handoff", "by": me, "to": to, "from": list(remove),
                                 "silenced": silenced, "note": note})
        seq = ch.seq
        removed = [u for u in dict.fromkeys(remove) if u in group.members]
        for user in removed:
            self.registry.part(group, user)
        self._announce_parting(me, group, removed)
        return {"group": group.id, "to": to, "added": added, "seq": seq, "removed": removed,
                "silenced": silenced}

    @staticmethod
    def _handed_over(group: Group, to: str, silence: list[str] | tuple[str, ...]) -> Group:
        """``group`` as :meth:`_hand_over` saves it (before ``remove`` leave, which
        only shortens it): ``to`` speaking, ``silence`` readers, out of the queue."""
        members = {**group.members}
        if members.get(to, READER) == READER:
            members[to] = MEMBER
        members.update({u: READER for u in silence if u in members})
        return replace(group, members=members, queued=None)

    def _queue(self, actor: Actor, group_id: str, remove: list[str], silence: list[str],
               note: str) -> dict[str, Any]:
        """Put conversation ``group_id`` in the queue for an advisor (PROTOCOL §3.16a)."""
        group = self.registry.hands_off(actor, group_id, remove, silence)
        note = self.masked_text(group.channel, note)
        already = group.queued is not None
        if not already:
            waiting = Waiting(time.time_ns() // 1000, actor.user, note, tuple(remove),
                              tuple(silence))
            self.admit(group, lambda: replace(group, queued=waiting))
            group.queued = waiting
            self.save(group)
            self.event(group, {"event": "queued", "by": actor.user, "note": note})
        assert group.queued is not None
        return {"group": group_id, "queued_at": group.queued.at_us / 1e6, "by": group.queued.by,
                "already": already}

    def _take(self, actor: Actor, group_id: str | None) -> dict[str, Any]:
        """Hand the waiting conversation ``group_id`` over to ``actor``, an advisor."""
        if not actor.advisor:
            raise refuse(ErrorCode.FORBIDDEN, "only an advisor (token role 'advisor') may take "
                         "a waiting conversation")
        if group_id is None:
            raise refuse(ErrorCode.NOT_FOUND, "no conversation is waiting for an advisor")
        group = self.registry.groups.get(group_id)
        if group is None or group.queued is None:
            raise refuse(ErrorCode.CONFLICT, f"{group_id!r} is not waiting for an advisor "
                         "(another advisor took it): take again")
        waiting = group.queued
        result = self._hand_over(actor.user, group, actor.user, waiting.remove, waiting.silence,
                                 waiting.note)
        return {**result, "queued_at": waiting.at_us / 1e6, "queued_by": waiting.by}

    def masked_text(self, channel: str, text: str) -> str:
        """``text`` a user wrote that goes into an event of ``channel`` (a hand-off's note),
        masked as a TEXT message there would be (PROTOCOL §5.8): events are not masked
        when sequenced, and nothing unmasked may reach the store."""
        rules = self.relay.masking.for_channel(channel) if text else None
        masked = rules.mask(ContentType.TEXT, text.encode()) if rules is not None else None
        return text if masked is None else masked.decode()

    def _announce_parting(self, me: str, group: Group, users: list[str]) -> None:
        if not users:
            return
        ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        # Saved ahead of the event (save), the others parting them once past it;
        # announced before parting here, so the leavers receive their own leave event.
        self.save(group, parts_at=ch.seq + 1)
        self.event(group, {"event": "leave", "by": me, "users": users})
        for user in users:
            self.relay.subs.part(user, ch)

    def admit(self, group: Group, after: Callable[[], Group]) -> None:
        """Refuse (``FRAME_TOO_LARGE``) a change of ``group`` if its record would then
        (``after()``: the group as the change leaves it) not fit one engine message
        (PROTOCOL §3.16): in a cluster the bucket could not take it, and nothing
        may change for a change that cannot be kept.  Asked before every change
        that can lengthen the record (create, add, role; handoff, take, queue);
        leave and remove only shorten it."""
        limit = self.relay.cluster.group_record_limit() if self.relay.cluster else None
        if limit is None:
            return
        size = len(orjson.dumps(self._record_of(group, after())))
        if size > limit:
            raise refuse(ErrorCode.FRAME_TOO_LARGE, f"group {group.id!r} would be too large to "
                         f"keep: its record would be {size} bytes, over this cluster's limit of "
                         f"{limit} (its nats-server's max_payload less headroom); not changed")

    def _record_of(self, group: Group, after: Group) -> dict[str, Any]:
        """The record :meth:`save` would write of ``group`` changed into ``after``
        (a joining member's seq and the record's at one past the channel's head,
        a fresh change id: at least as long as the real one): nothing is changed."""
        ch = self.relay.hub.find(group.channel)
        head = ch.seq + 1 if ch is not None else 1

        def joined_at(user: str) -> int:
            if user not in group.members:
                return head
            return self.relay.memberships.get(user, {}).get(ch, 0) if ch is not None else 0
        record = {**after.record(), "version": group.version + 1, "change": "0" * 16}
        return {**record, "joined": {u: joined_at(u) for u in after.members}, "seq": head,
                "after": group.change}

    def request(self, actor: Actor, request: GroupRequest) -> Answer:
        """Run GROUP ``request`` of ``actor``: its RESULT, or, in a cluster, ERROR
        ``INTERNAL`` if the group's bucket refused the change (another node changed
        the group meanwhile: the bucket's record stands).  Asked for once the
        change is stored (``after_store``)."""
        writes: list[asyncio.Future[bool]] = []
        self._writes = writes
        try:
            result = self.run(actor, request)
        finally:
            self._writes = None

        def answer(rid: int) -> bytes:
            if all(w.done() and w.result() for w in writes):
                return encode_json(FrameType.RESULT, result, rid)
            return encode_error(ErrorCode.INTERNAL, GROUP_CHANGED_ELSEWHERE, rid)
        return answer

    def event(self, group: Group, event: dict[str, Any]) -> None:
        ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        self.relay.hub.publish_event(ch, event.get("by", group.owner), orjson.dumps(event),
                               ContentType.EVENT)

    def save(self, group: Group, parts_at: int | None = None) -> None:
        """Persist ``group`` (members, roles and when each joined), ordered with its
        messages, and give it to the other workers.

        Called before the change's events are sequenced: every worker (node) has
        the change before it can deliver an event announcing it, so a client that
        has its event finds it made there (PROTOCOL §3.16, "Membership and its
        events").  Between workers the record goes at once and the event once
        stored; a cluster's store hands both back in this order.
        """
        ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        after = group.changed()
        joined = {u: self.relay.memberships.get(u, {}).get(ch, 0) for u in group.members}
        # ``seq``: where leavers part elsewhere, once their replica has passed it
        # (apply): ``parts_at``, the seq their leave event will have, else the
        # channel's head.  ``after``: the change it was made over (a cluster's
        # bucket takes it only over that one).
        seq = ch.seq if parts_at is None else parts_at
        record = {**group.record(), "joined": joined, "seq": seq, "after": after}
        if self.relay.store is not None:
            written = self.relay.store.save_group(group.id, record)
            if written is not None and self._writes is not None:
                self._writes.append(written)
        if self.relay.cluster is not None:
            self.relay.cluster.group_saved(record)

    def apply(self, record: dict[str, Any], seq: int) -> None:
        """A group as its owning worker changed it, when its channel was at ``seq``.

        New members join here at once; leavers are refused here at once (the
        registry, the cached publish permission) and stop receiving once this
        replica has passed ``seq``, so they still receive their own leave event.
        """
        held = self.registry.groups.get(record["id"])
        if held is not None and held.newer_than(record):
            return                   # this change, or a later one, is here already
        group, added, removed = self.registry.replace(record)
        ch = self.relay.hub.channel(group.channel, ChannelKind.GROUP_CHAT)
        ch.info = group
        for user, role in group.members.items():
            if role == READER:
                self.relay.forget_publish(user)     # silenced: a cached permission must not outlive it
        cluster = self.relay.cluster
        assert cluster is not None
        if added and cluster.pending_parts:
            # Re-added before this replica passed the leave event: stays (in place:
            # the compiled receiver holds this list).
            cluster.pending_parts[:] = [p for p in cluster.pending_parts
                                        if p[0] is not ch or p[2] not in added]
        for user in added:
            self.relay.subs.join(user, ch, record["joined"].get(user, 0))
        for user in removed:
            if ch.seq >= seq or not cluster.ready(ch):
                self.relay.subs.part(user, ch, delivered=True)
            else:
                self.relay.forget_publish(user)
                cluster.pending_parts.append((ch, seq, user))
