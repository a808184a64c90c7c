"""The Locust user that speaks fenghuo, and how users of one scenario find each other.

:class:`FenghuoUser` holds one :class:`~loadtest.wire.WireClient` connection
and turns everything it does into Locust request statistics:

=============  ==========================  ====================================================
request type   name                        what is timed
=============  ==========================  ====================================================
``CONNECT``    the role (``resident``...)  TCP connect + HELLO until WELCOME
``PUBLISH``    the message kind            PUBLISH until its ACK
``DELIVER``    the message kind            send stamp in the payload until the MESSAGE is read
                                           here, at the receiving user (``time.time()`` on
                                           both sides: one machine, one clock)
``READ``       the message kind            send stamp until the sender reads the READ receipt
``CONNECTION`` ``lost``                    (failure only) the relay closed or broke the
                                           connection; the user connects again
=============  ==========================  ====================================================

plus the control requests each scenario makes (``GROUP``, ``RECEIPT``,
``HISTORY``, ``SUBSCRIBE``, ``CURSOR``, ``ANSWER``).  Failures carry the
relay's documented error code and text (``[120] TOKEN_INVALID: ...``), a
timeout or the reason a connection was lost.

Every message a user publishes is a JSON card ``{"kind", "sent", "from", ...}``
(content type ``CARD``): ``kind`` names the DELIVER row, ``sent`` is the
sender's ``time.time()``.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, TypedDict, TypeVar

import gevent
import gevent.queue
import orjson
from fenghuo.core import Ack, ContentType, FrameType, Message, Receipt, ReceiptKind
from locust import User

from fenghuo.client import FenghuoError, parse_server
from fenghuo.tokens import TokenError, issue_token, resolve_secret
from loadtest.wire import WireClient

T = TypeVar("T")

RUN_TAG = secrets.token_hex(2)
"""Random per process: user, group and org ids of one run never meet those of an
earlier run against the same (durable) relay."""

RECONNECT_PAUSE = 1.0
"""Seconds a user waits after a failed connect before its next task tries again."""

NO_PARTNER_PAUSE = 0.2
"""Seconds a user waits when its scenario has no partner online for it yet."""

_STAMPS_KEPT = 10_000   # own messages remembered for READ latency, per user


class Grants(TypedDict, total=False):
    """A token's claims beyond the user id, as ``issue_token`` takes them."""

    channels: list[str]
    read: list[str]
    roles: list[str]

class CheckFailed(Exception):
    """A reply arrived but does not say what the scenario expects."""


FAILURES = (FenghuoError, TimeoutError, OSError, TokenError, CheckFailed)
"""What a timed action may raise that is the relay's (or the network's) fault."""


@functools.cache
def signing_secret() -> str:
    """The relay's secret: ``FENGHUO_SECRET``, else the dev secret ``make serve`` wrote
    under ``FENGHUO_DATA_DIR`` (default ``./data``)."""
    return resolve_secret(os.environ.get("FENGHUO_SECRET"),
                          os.environ.get("FENGHUO_DATA_DIR", "data"))[0]


class FenghuoUser(User):
    """A Locust user with one fenghuo connection (abstract: scenarios subclass it).

    Subclasses set ``role`` (the first part of the user id), may list the card
    kinds they act on in ``inbox_kinds`` (those are queued on :attr:`inbox`
    for their tasks, since callbacks run in the reader greenlet and must not
    wait there), and override the ``on_*`` hooks.
    """

    abstract = True
    role: ClassVar[str] = "user"
    inbox_kinds: ClassVar[frozenset[str]] = frozenset()
    _serials: ClassVar[itertools.count]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._serials = itertools.count()

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.serial = next(type(self)._serials)
        # Set by the master before a worker spawns anyone; 0 when not distributed.
        worker = max(getattr(environment.runner, "worker_index", 0), 0)
        self.user_id = f"{self.role}-{RUN_TAG}-w{worker}-{self.serial}"
        self.wire: WireClient | None = None
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.stopping = False
        self._sent: OrderedDict[tuple[str, int], tuple[float, str]] = OrderedDict()

    # ------------------------------------------------------------ hooks

    def grants(self) -> Grants:
        """Token claims beyond the user id (``channels``, ``read``, ``roles``)."""
        return {}

    def on_connected(self) -> None:
        """Called after every successful connect."""

    def on_disconnected(self) -> None:
        """Called when the connection is lost and when the user stops."""

    def on_card(self, message: Message, card: dict[str, Any]) -> None:
        """A card from another user arrived (its DELIVER is already reported)."""
        if card.get("kind") in self.inbox_kinds:
            self.inbox.put((message, card))

    def on_event(self, message: Message, event: dict[str, Any]) -> None:
        """A server event (group join/leave...) arrived."""

    # ------------------------------------------------------------ Locust

    def on_start(self) -> None:
        self.connect()

    def on_stop(self) -> None:
        self.stopping = True
        self.on_disconnected()
        if self.wire is not None:
            self.wire.close()

    # ------------------------------------------------------------ connection

    def connect(self) -> bool:
        """Connect and authenticate, reporting ``CONNECT``; False (after a pause) on failure."""
        started = time.perf_counter()
        try:
            address = parse_server(self.host or "")
            host, port = address.host, address.port
            token = issue_token(signing_secret(), self.user_id, **self.grants())
            wire = WireClient(host, port, token, on_message=self._on_message,
                              on_receipt=self._on_receipt, on_lost=self._on_lost)
            wire.connect()
        except FAILURES as exc:
            self.report("CONNECT", self.role, started, exception=exc)
            gevent.sleep(RECONNECT_PAUSE)
            return False
        self.report("CONNECT", self.role, started)
        self.wire = wire
        self.inbox = gevent.queue.Queue()
        self.on_connected()
        return True

    def ensure_connected(self) -> bool:
        """True when connected, connecting again first if the connection was lost."""
        if self.wire is not None and self.wire.alive:
            return True
        return self.connect()

    # ------------------------------------------------------------ reporting

    def report(self, request_type: str, name: str, started: float | None = None, *,
               elapsed_ms: float | None = None, length: int = 0,
               exception: BaseException | None = None) -> None:
        """Fire one Locust request event, timed from ``started`` (perf_counter) or given."""
        if elapsed_ms is None:
            elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=elapsed_ms,
            response_length=length, exception=exception, context={"user": self.user_id})

    def timed(self, request_type: str, name: str, action: Callable[[], T],
              length: Callable[[T], int] = lambda _: 0) -> T | None:
        """Run ``action`` on the connection and report it; its result, or None if it failed."""
        if not self.ensure_connected():
            return None
        started = time.perf_counter()
        try:
            result = action()
        except FAILURES as exc:
            self.report(request_type, name, started, exception=exc)
            return None
        self.report(request_type, name, started, length=length(result))
        return result

    # ------------------------------------------------------------ messaging

    def control(self, ftype: int, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """A JSON control request (GROUP, SUBSCRIBE, CURSOR...), reported under its frame
        type; its RESULT body, or None if it failed."""
        return self.timed(FrameType(ftype).name, name, lambda: self._wire().request(ftype, body))

    def publish_card(self, channel: str, kind: str, **fields: Any) -> Ack | None:
        """Publish a stamped card and wait for its ACK (reported as ``PUBLISH kind``)."""
        sent = time.time()
        payload = orjson.dumps({"kind": kind, "sent": sent, "from": self.user_id, **fields})
        ack = self.timed("PUBLISH", kind, lambda: self._wire().publish(
            channel, payload, ContentType.CARD), length=lambda _: len(payload))
        if ack is not None:
            self._sent[(ack.channel, ack.seq)] = (sent, kind)
            if len(self._sent) > _STAMPS_KEPT:
                self._sent.popitem(last=False)
        return ack

    def mark_read(self, message: Message, name: str) -> bool:
        """Send a READ receipt for ``message`` and wait for the relay's RESULT."""
        return self.timed("RECEIPT", name, lambda: self._wire().receipt(
            message.channel, message.seq, ReceiptKind.READ)) is not None

    def next_card(self, timeout: float = 1.0) -> tuple[Message, dict[str, Any]] | None:
        """The next queued ``(message, card or event)``, or None after ``timeout`` seconds."""
        try:
            return self.inbox.get(timeout=timeout)
        except gevent.queue.Empty:
            return None

    def wait_for_partner(self) -> None:
        """Pause a task that found no partner online in its scenario yet."""
        gevent.sleep(NO_PARTNER_PAUSE)

    def _wire(self) -> WireClient:
        if self.wire is None:
            raise FenghuoError(0, "not connected")
        return self.wire

    # ------------------------------------------------------------ reader greenlet

    def _on_message(self, message: Message) -> None:
        if message.sender == self.user_id:
            return   # our own publish, echoed to our own subscription
        if message.content_type == ContentType.EVENT:
            self.on_event(message, orjson.loads(message.payload))
            return
        if message.content_type != ContentType.CARD:
            return
        card = orjson.loads(message.payload)
        sent = card.get("sent")
        if isinstance(sent, (int, float)):
            self.report("DELIVER", str(card.get("kind")), elapsed_ms=(time.time() - sent) * 1000,
                        length=len(message.payload))
        self.on_card(message, card)

    def _on_receipt(self, receipt: Receipt) -> None:
        if receipt.kind != ReceiptKind.READ:
            return
        stamp = self._sent.pop((receipt.channel, receipt.seq), None)
        if stamp is not None:
            sent, kind = stamp
            self.report("READ", kind, elapsed_ms=(time.time() - sent) * 1000)

    def _on_lost(self, reason: Exception) -> None:
        if self.stopping:
            return
        self.report("CONNECTION", "lost", exception=reason)
        self.on_disconnected()


class Roster:
    """The heads of one scenario in this worker process and the members attached to each.

    How roles pair up, without any coordination between workers: a user that
    serves others (billing, bot, advisor, head office) *opens* itself here once
    connected; a user that needs one (resident, customer, bot, store) *joins*
    the roster and is attached to the open head with the fewest members, the
    earliest opened on a tie.  Heads address only members attached to them,
    and only while attached (members detach when they stop or lose their
    connection), so every message has a receiver online.  Both sides live in
    the same Locust process, so each worker pairs its own users.
    """

    def __init__(self) -> None:
        self._members: dict[FenghuoUser, list[FenghuoUser]] = {}
        self._head_of: dict[FenghuoUser, FenghuoUser] = {}

    def open(self, head: FenghuoUser) -> None:
        self._members.setdefault(head, [])

    def close(self, head: FenghuoUser) -> None:
        """``head`` is gone: its members are detached (they join again)."""
        for member in self._members.pop(head, []):
            self._head_of.pop(member, None)

    def choose(self) -> FenghuoUser | None:
        """The open head with the fewest members, or None."""
        return min(self._members, key=lambda head: len(self._members[head]), default=None)

    def attach(self, member: FenghuoUser, head: FenghuoUser) -> None:
        self.detach(member)
        if head in self._members:
            self._members[head].append(member)
            self._head_of[member] = head

    def join(self, member: FenghuoUser) -> FenghuoUser | None:
        """``member``'s head, attaching it to :meth:`choose` if it has none."""
        head = self._head_of.get(member)
        if head is None and (head := self.choose()) is not None:
            self.attach(member, head)
        return head

    def detach(self, member: FenghuoUser) -> None:
        head = self._head_of.pop(member, None)
        if head is not None:
            self._members[head].remove(member)

    def head_of(self, member: FenghuoUser) -> FenghuoUser | None:
        return self._head_of.get(member)

    def members(self, head: FenghuoUser) -> list[FenghuoUser]:
        return list(self._members.get(head, ()))
