"""SCHEDULE (docs/PROTOCOL.md §3.17a): the protocol's face of the scheduled messages.

No second scheduler: a request runs through the server API's own path
(server/api.py :func:`schedule_one`, :func:`pending_scheduled`,
:func:`cancel_scheduled`) on the process that owns the timers (the relay, or
worker 0 of several, to which the other workers forward it), with the
connection's user as the sender.  What PUBLISH checks that needs the
connection's token (its grants, a service user's confinement, a group
reader) is checked before, where the connection is (server/session.py).
"""

from __future__ import annotations

from typing import Any

from fenghuo.core import ErrorCode, ProtocolError
from fenghuo.server.api import (
    Api,
    ApiError,
    PublishCall,
    cancel_scheduled,
    pending_scheduled,
    schedule_one,
)
from fenghuo.server.schemas import (
    HISTORY_DEFAULT,
    ScheduleCancel,
    ScheduleList,
    SchedulePublish,
    ScheduleRequest,
)


async def serve(api: Api, user: str, request: ScheduleRequest) -> dict[str, Any]:
    """The RESULT of ``user``'s SCHEDULE ``request``; a refusal is a non-fatal ProtocolError."""
    try:
        match request:
            case SchedulePublish():
                call = PublishCall(channel=request.channel, data=request.data,
                                   data_b64=request.data_b64, content_type=request.content_type,
                                   meta=request.meta, idempotency_key=request.key, sender=user,
                                   send_at=request.send_at)
                return await schedule_one(api, call)
            case ScheduleList(after=after, limit=limit):
                found = await pending_scheduled(api, after or 0, limit or HISTORY_DEFAULT, user)
                return {"scheduled": [_as_wire(s) for s in found]}
            case ScheduleCancel(id=timer_id):
                return await cancel_scheduled(api, timer_id, user)
    except ApiError as exc:
        raise ProtocolError(exc.code, exc.message.replace("publish: ", "SCHEDULE: ", 1),
                            False) from None
    raise ProtocolError(ErrorCode.MALFORMED_BODY, "SCHEDULE: unknown op", False)


def _as_wire(item: dict[str, Any]) -> dict[str, Any]:
    """A listed scheduled message in SCHEDULE's field names (``key``, no ``sender``)."""
    out = {k: v for k, v in item.items() if k not in ("sender", "idempotency_key")}
    if "idempotency_key" in item:
        out["key"] = item["idempotency_key"]
    return out
