"""History: a page of a channel's past, from its ring where it reaches, else the store
(PROTOCOL §3.15, §3.15a).  Who may read it is checked before (server/access.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fenghuo.core import Channel
from fenghuo.server.frames import message_seq, message_time
from fenghuo.server.schemas import HISTORY_DEFAULT, INT64_MAX, History

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay


async def read(relay: Relay, ch: Channel, request: History) -> list[bytes]:
    """A page of ``ch``'s messages, oldest first: from the ring where it reaches, else the store.

    Read-your-writes: it includes every message sequenced in ``ch`` here
    before the request, also those still on their way to the disk (a
    GROUP change's event is answered with its seq as soon as it is
    sequenced; a PUBLISH only once it is released).
    """
    await relay.subs.ready(ch)
    if relay.cluster is not None:
        await relay.cluster.before_read(ch)
    store = relay.store
    if ch.ring.head < ch.seq:
        await relay.released()
    limit, before, after = request.limit or HISTORY_DEFAULT, request.before, request.after
    if request.since_us is not None or request.until_us is not None:
        # Either bound may be absent (§3.15a); an absent one is the widest
        # an SQLite INTEGER holds (1 << 63 overflowed it: issue 10 item 5).
        since = 0 if request.since_us is None else request.since_us
        until = INT64_MAX if request.until_us is None else request.until_us
        if store is not None:
            return await store.read_by_time(ch.name, since, until, limit)
        return [f for f in ch.ring.since(0) if since <= message_time(f) < until][:limit]
    if after is not None:
        low, high = after, ch.ring.head + 1
        ring = ch.ring.resume_from(after)
        if ring is not None or store is None:
            return (ring or ch.ring.since(after))[:limit]
        return await store.read(ch.name, low, high, limit)
    high = ch.ring.head + 1 if before is None else min(before, ch.ring.head + 1)
    low = max(0, high - 1 - limit)
    ring = ch.ring.resume_from(low)
    if ring is not None or store is None:
        return [f for f in (ring or ch.ring.since(low)) if message_seq(f) < high][-limit:]
    return await store.read_latest(ch.name, high, limit)
