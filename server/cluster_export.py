"""``fenghuo export --cluster``: what an export reads, from a cluster's engine.

A cluster node's SQLite holds no message (docs/DESIGN.md, "Where state
lives"): an export on any node reads the channels' messages from the
stream ``FENGHUO`` and the groups from the bucket ``fenghuo_groups``, so it
has every message of the cluster, including those of channels the node
never saw live.  The lines, summary and signature are written by
:func:`fenghuo.server.export.export`, exactly as for a single node.
"""

from __future__ import annotations

import nats
import nats.errors
import nats.js.errors
import orjson

from fenghuo.channels import group_channel
from fenghuo.server.jetstream import GROUPS, Engine, present_entries

#: seconds to reach a NATS server before the export gives up (a relay waits forever)
CONNECT_TIMEOUT = 5.0
_EVERY = 1 << 62


async def read(urls: list[str], channel: str | None,
               user: str | None) -> dict[str, list[tuple[int, bytes]]]:
    """Channel -> its stored (seq, frame)s in seq order: ``channel``, or the
    channels of ``user`` (their direct chats, their groups, every organisation
    channel: the export keeps only what the user said there)."""
    try:
        # Two tries of each server, not allow_reconnect=False: nats-py 2.x then
        # waits forever on a refused first connection.
        nc = await nats.connect(urls, name="fenghuo-export", connect_timeout=CONNECT_TIMEOUT,
                                max_reconnect_attempts=1, reconnect_time_wait=0.2,
                                error_cb=_quiet)
    except (nats.errors.Error, OSError) as exc:
        raise ConnectionError(f"no NATS server answered ({exc or type(exc).__name__})") from None
    engine = Engine(nc, 1)
    try:
        names = [channel] if channel else await _user_channels(engine, user or "")
        out = {}
        for name in names:
            try:
                stored = await engine.read(name, 0, _EVERY, _EVERY)
            except nats.js.errors.NotFoundError:
                stored = []                  # no stream yet: nothing was ever stored
            out[name] = [(m.seq, m.frame) for m in stored]
        return out
    finally:
        await nc.close()


async def _quiet(exc: Exception) -> None:
    """nats-py prints each failed try with its traceback unless given this."""


async def _user_channels(engine: Engine, user: str) -> list[str]:
    try:
        direct = [name for name in await engine.channels("dm:") if user in name[3:].split(":")]
        orgs = await engine.channels("org")
    except nats.js.errors.NotFoundError:
        direct, orgs = [], []
    groups = []
    try:
        present = await present_entries(engine.js, GROUPS)
    except nats.js.errors.NotFoundError:
        present = {}
    for entry in present.values():
        if entry.value:
            record = orjson.loads(entry.value)
            if user in record["members"]:
                groups.append(group_channel(record["id"]))
    return sorted(set(direct) | set(groups) | set(orgs))
