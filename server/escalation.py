"""Deadline fallback: a message's delivery policy, and the escalation timers it makes.

A publish may carry ``escalate``: steps ``{"if_not": "delivered"|"read",
"after_s": s}``.  Each step is one durable timer per **message** (not per
recipient), due ``after_s`` after the message was sequenced; only one step of
a message is pending at a time, the next made when one fires ("steps
chain").  When a step fires, the recipients are derived as for the
message's status (server/status.py): each one not yet at the step's state is
escalated, an ``escalation`` webhook event (recipient, message, step) is
written to the outbox and the escalation filed for the status, in the store
transaction that deletes the timer.  A recipient who got or read the message
in time is passed over: that is the cancellation, decided from the cursors
at the deadline rather than by a timer per recipient touched at every
receipt.  A message everyone has read ends its chain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import Meta

from fenghuo.server import status
from fenghuo.server.outbox import WebhookEvent
from fenghuo.server.schemas import Body
from fenghuo.server.timers import ESCALATE, NewTimer, Outcome, Timer

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay
    from fenghuo.server.timers import Timers

log = logging.getLogger("fenghuo.escalation")

MAX_STEPS = 8
MAX_AFTER_S = 366 * 86400


class Step(Body, frozen=True, forbid_unknown_fields=True):
    if_not: Annotated[Literal["delivered", "read"], Meta(description=(
        '"delivered" or "read": the state a recipient must have reached'))]
    after_s: Annotated[float, Meta(ge=0, le=MAX_AFTER_S, description=(
        "seconds after the message was sequenced (0 to 366 days)"))]


# The refusal of any part of a policy is this text (the schema names the top field only):
# it says what a step is, so a wrong `if_not` or `after_s` is told.
Steps = Annotated[list[Step], Meta(min_length=1, max_length=MAX_STEPS, description=(
    f'1-{MAX_STEPS} steps, each {{"if_not": "delivered" or "read", "after_s": seconds 0 to 366 '
    'days}, `after_s` not decreasing'))]


class Pending(msgspec.Struct, frozen=True):
    """An escalation timer's body: the message and where its policy is."""

    channel: str
    seq: int
    ts_us: int
    sender: str
    steps: list[Step]
    step: int


def check(steps: list[Step]) -> str | None:
    """Why ``steps`` are not a policy, or None."""
    if any(b.after_s < a.after_s for a, b in zip(steps, steps[1:])):
        return "escalate: `after_s` must not decrease from one step to the next"
    return None


def timer(p: Pending) -> NewTimer:
    """The timer of step ``p.step`` (its unique key makes a retried publish add none)."""
    due = p.ts_us + int(p.steps[p.step].after_s * 1e6)
    return NewTimer(due, ESCALATE, msgspec.json.encode(p),
                    f"{ESCALATE}\0{p.channel}\0{p.seq}\0{p.step}")


async def start(timers: Timers, channel: str, seq: int, ts_us: int, sender: str,
                steps: list[Step]) -> None:
    """Arm the first step of a message's policy (a no-op if it is armed already)."""
    await timers.add([timer(Pending(channel, seq, ts_us, sender, steps, 0))])


async def fire(relay: Relay, timers: Timers, batch: list[Timer], outcome: Outcome) -> None:
    """Escalate the recipients of each due step who have not reached its state; arm the next."""
    following = []
    for t in batch:
        p = msgspec.json.decode(t.body, type=Pending)
        step = p.steps[p.step]
        ch = relay.ensure_channel(p.channel)
        users = status.recipients(ch.kind, status.joined(relay, ch), p.seq, p.sender) or []
        states = {u: status.state_of(relay, p.channel, u, p.seq) for u in users}
        for user, state in states.items():
            if state == "read" or step.if_not == "delivered" and state == "delivered":
                continue
            outcome.escalated.append((p.channel, p.seq, user, p.step))
            outcome.events.append(WebhookEvent("escalation", p.channel, {
                "recipient": user, "channel": p.channel, "seq": p.seq, "sender": p.sender,
                "step": p.step, "if_not": step.if_not, "after_s": step.after_s, "status": state}))
            relay.progress.escalated += 1
        if p.step + 1 < len(p.steps) and any(s != "read" for s in states.values()):
            following.append(timer(msgspec.structs.replace(p, step=p.step + 1)))
        outcome.done.append(t.id)
    if following:
        # Committed before this step's row goes: a crash between them repeats
        # this step's events (at least once), never loses the next step.
        await timers.add(following)
