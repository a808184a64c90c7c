"""Locust load test of a fenghuo relay: the product brief's three scenarios.

Run it through ``python -m loadtest`` (starts its own relay, headless, CSV and
HTML reports) or directly against a relay you started::

    FENGHUO_SECRET=... locust -f loadtest/locustfile.py --host tcp://127.0.0.1:7700

from the project folder (see loadtest/README.md).  Each scenario has users
that serve (billing, bot, advisor, head office) and users that are served
(residents, customers, stores); the class weights keep one server per
``weight`` served users, and :class:`~loadtest.user.Roster` pairs them inside
each worker process.

* **Housing estate.**  ``EstateBilling`` sends scheduled fee reminders to each
  of its residents on their direct channel and posts notices to its estate
  group; ``Resident`` marks each reminder read and replies with a question.
* **Bank advisory chat.**  ``BankCustomer`` opens a conversation (a group with
  a ``BankBot``) and asks questions; the bot answers ``BOT_TURNS`` of them, then
  adds a ``BankAdvisor``, who reads the conversation so far (HISTORY) and
  answers from then on; after ``ADVISOR_TURNS`` advisor answers the customer
  starts a new conversation.
* **Retail chain.**  ``HeadOffice`` broadcasts announcements to its whole chain
  (``org.retail.<chain>``) or to one region (``org.retail.<chain>.<region>``);
  each ``Store`` subscribes ``org.retail.<chain>.<region>.<store>``, so org
  prefix delivery brings it both, and marks each announcement read; the head
  office times the read receipts and asks the relay how many stores have read
  each announcement (CURSOR ``readers``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Any

import orjson
from fenghuo.core import ContentType, FrameType, Message
from locust import between, constant, constant_pacing, events, task
from locust.runners import MasterRunner, WorkerRunner

from fenghuo.channels import direct_channel, group_channel
from loadtest.report import readers_line
from loadtest.user import CheckFailed, FenghuoUser, Grants, Roster

log = logging.getLogger("loadtest")

ESTATE = Roster()     # billing schedulers and their residents
BANK = Roster()       # bots and the customers they chat with
ADVISORS = Roster()   # advisors and the bots that hand conversations over to them
RETAIL = Roster()     # head offices and their stores

NOTICE_EVERY = 3      # billing runs per estate notice
BOT_TURNS = 2         # bot answers in a conversation before the handover
ADVISOR_TURNS = 2     # advisor answers before the customer starts a new conversation
ANSWER_TIMEOUT = 10.0
READ_GRACE = 1.0      # seconds before the head office asks who has read an announcement
REGIONS = ("north", "east", "south", "west")

READERS: collections.Counter[str] = collections.Counter()
"""``read`` and ``expected`` summed over CURSOR ``readers`` answers (retail)."""


# ---------------------------------------------------------------- housing estate

class EstateBilling(FenghuoUser):
    """Sends every resident attached to it a fee reminder once a second (scheduled),
    and every ``NOTICE_EVERY``-th run also a notice to the estate group."""

    role = "billing"
    weight = 1
    wait_time = constant_pacing(1.0)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.estate_group = f"estate-{self.user_id}"
        self.group_ready = False
        self.enrolled: set[str] = set()
        self.runs = itertools.count()

    def on_connected(self) -> None:
        if not self.group_ready:
            self.group_ready = self.control(FrameType.GROUP, "create estate", {
                "op": "create", "group": self.estate_group, "title": "Estate notices"}) is not None
        ESTATE.open(self)

    def on_disconnected(self) -> None:
        ESTATE.close(self)

    @task
    def run_schedule(self) -> None:
        if not self.ensure_connected():   # also reopens the roster after a lost connection
            return
        residents = ESTATE.members(self)
        for resident in residents:
            self.enrol(resident)
            self.publish_card(direct_channel(self.user_id, resident.user_id), "fee_reminder",
                              amount_cents=12_500, due="2026-12-01")
        notice_due = next(self.runs) % NOTICE_EVERY == NOTICE_EVERY - 1
        if notice_due and any(r.user_id in self.enrolled for r in residents):
            self.publish_card(group_channel(self.estate_group), "estate_notice",
                              text="Water off on Tuesday 9-11")

    def enrol(self, resident: FenghuoUser) -> None:
        """Add a newly attached resident to the estate group."""
        if not self.group_ready or resident.user_id in self.enrolled:
            return
        if self.control(FrameType.GROUP, "add resident", {
                "op": "add", "group": self.estate_group, "users": [resident.user_id]}) is not None:
            self.enrolled.add(resident.user_id)


class Resident(FenghuoUser):
    """Marks each fee reminder read and asks the billing side a question about it."""

    role = "resident"
    weight = 4
    wait_time = constant(0)   # tasks wait on the inbox
    inbox_kinds = frozenset({"fee_reminder"})

    def on_disconnected(self) -> None:
        ESTATE.detach(self)

    @task
    def answer_reminders(self) -> None:
        if not self.ensure_connected():
            return
        if ESTATE.join(self) is None:
            self.wait_for_partner()
            return
        item = self.next_card()
        if item is None:
            return
        message, _card = item
        self.mark_read(message, "fee_reminder read")
        self.publish_card(message.channel, "resident_question", about=message.seq,
                          text="Can I pay in two instalments?")


# ---------------------------------------------------------------- bank advisory chat

class BankCustomer(FenghuoUser):
    """Chats with a bot in a conversation group; reports each question-to-answer turn
    as ``ANSWER`` (by who answered) and a missing answer as its failure."""

    role = "customer"
    weight = 3
    wait_time = between(0.3, 1.0)
    inbox_kinds = frozenset({"bot_answer", "advisor_answer"})

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.conversations = itertools.count()
        self.conversation: str | None = None
        self.bot: FenghuoUser | None = None
        self.advisor_answers = 0

    def on_connected(self) -> None:
        self.conversation = None   # a new connection starts a new conversation

    def on_disconnected(self) -> None:
        BANK.detach(self)

    @task
    def converse(self) -> None:
        if not self.ensure_connected():
            return
        bot = BANK.join(self)
        if bot is None:
            return
        if (self.conversation is None or bot is not self.bot) and not self.open_conversation(bot):
            return
        channel = self.conversation
        assert channel is not None
        asked = time.perf_counter()
        if self.publish_card(channel, "customer_question", text="How do I raise my card limit?") is None:
            return
        answer = self.await_answer(channel)
        if answer is None:
            self.report("ANSWER", "none", asked, exception=TimeoutError(
                f"no answer in {channel} within {ANSWER_TIMEOUT:g} s"))
            self.conversation = None
            return
        self.report("ANSWER", answer, asked)
        if answer == "advisor_answer":
            self.advisor_answers += 1
            if self.advisor_answers >= ADVISOR_TURNS:
                self.conversation = None

    def open_conversation(self, bot: FenghuoUser) -> bool:
        """A new group with the bot in it, the bot made admin so it can hand over."""
        group = f"advice-{self.user_id}-{next(self.conversations)}"
        for name, body in (
            ("open conversation", {"op": "create", "group": group, "members": [bot.user_id],
                                   "title": "Advisory chat"}),
            ("bot admin", {"op": "role", "group": group, "user": bot.user_id, "role": "admin"}),
        ):
            if self.control(FrameType.GROUP, name, body) is None:
                return False
        self.conversation, self.bot, self.advisor_answers = group_channel(group), bot, 0
        return True

    def await_answer(self, channel: str) -> str | None:
        """The kind of the next answer in ``channel``; older conversations' answers are skipped."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            item = self.next_card(left)
            if item is not None and item[0].channel == channel:
                return str(item[1]["kind"])
        return None


class BankBot(FenghuoUser):
    """Answers customers' questions; after ``BOT_TURNS`` answers in a conversation it
    adds an advisor and says so (``handover``), and stays quiet there from then on."""

    role = "bot"
    weight = 1
    wait_time = constant(0)
    inbox_kinds = frozenset({"customer_question"})

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.answered: collections.Counter[str] = collections.Counter()
        self.handed_over: set[str] = set()

    def on_connected(self) -> None:
        BANK.open(self)

    def on_disconnected(self) -> None:
        BANK.close(self)
        ADVISORS.detach(self)

    @task
    def answer(self) -> None:
        if not self.ensure_connected():
            return
        item = self.next_card()
        if item is None:
            return
        channel = item[0].channel
        if channel in self.handed_over:
            return
        advisor = ADVISORS.join(self) if self.answered[channel] >= BOT_TURNS else None
        if advisor is not None:
            self.hand_over(channel, advisor)
        elif self.publish_card(channel, "bot_answer", text="Open the app, Cards, Limits.") is not None:
            self.answered[channel] += 1

    def hand_over(self, channel: str, advisor: FenghuoUser) -> None:
        group = channel.removeprefix("group:")
        if self.control(FrameType.GROUP, "handover", {
                "op": "add", "group": group, "users": [advisor.user_id]}) is None:
            return
        self.handed_over.add(channel)
        self.publish_card(channel, "handover", advisor=advisor.user_id)


class BankAdvisor(FenghuoUser):
    """Joins conversations the bots hand over, reads each one's history, and answers
    its customer's questions."""

    role = "advisor"
    weight = 1
    wait_time = constant(0)
    inbox_kinds = frozenset({"customer_question"})

    def on_connected(self) -> None:
        ADVISORS.open(self)

    def on_disconnected(self) -> None:
        ADVISORS.close(self)

    def on_event(self, message: Message, event: dict[str, Any]) -> None:
        if event.get("event") == "join" and self.user_id in event.get("users", ()):
            self.inbox.put((message, event))

    @task
    def advise(self) -> None:
        if not self.ensure_connected():
            return
        item = self.next_card()
        if item is None:
            return
        message, _ = item
        if message.content_type == ContentType.EVENT and not self.take_over(message.channel):
            return
        self.publish_card(message.channel, "advisor_answer", text="I have raised it for you.")

    def take_over(self, channel: str) -> bool:
        """Read the conversation from its start; it must hold the customer's questions."""
        return self.timed("HISTORY", "advice conversation", lambda: self.read_questions(channel),
                          length=lambda page_bytes: page_bytes) is not None

    def read_questions(self, channel: str) -> int:
        messages, size = self._wire().history({"channel": channel, "after": 0, "limit": 100})
        asked = sum(1 for m in messages if m.content_type == ContentType.CARD
                    and orjson.loads(m.payload).get("kind") == "customer_question")
        # The bot answered BOT_TURNS questions and handed over at the next one.
        if asked < BOT_TURNS + 1:
            raise CheckFailed(f"history of {channel} holds {asked} customer questions, "
                              f"expected at least {BOT_TURNS + 1}")
        return size


# ---------------------------------------------------------------- retail chain

class HeadOffice(FenghuoUser):
    """Broadcasts an announcement once a second, alternately to the whole chain and
    to one region that has stores; then counts who has read each."""

    role = "hq"
    weight = 1
    wait_time = constant_pacing(1.0)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.chain = f"org.retail.{self.user_id}"
        self.rounds = itertools.count()
        self.unchecked: collections.deque[tuple[float, str, int, int]] = collections.deque()

    def grants(self) -> Grants:
        # Concrete names are subscribed at HELLO, so CURSOR may ask about them.
        return {"channels": [self.chain, *(f"{self.chain}.{r}" for r in REGIONS),
                             f"{self.chain}.>"]}

    def on_connected(self) -> None:
        RETAIL.open(self)

    def on_disconnected(self) -> None:
        RETAIL.close(self)

    @task
    def announce(self) -> None:
        if not self.ensure_connected():
            return
        self.count_readers()
        stores = [s for s in RETAIL.members(self) if isinstance(s, Store)]
        if not stores:
            return
        regions = sorted({store.region for store in stores})
        turn = next(self.rounds)
        if turn % 2 == 0:
            channel, kind, audience = self.chain, "chain_announcement", len(stores)
        else:
            region = regions[turn // 2 % len(regions)]
            channel, kind = f"{self.chain}.{region}", "region_announcement"
            audience = sum(1 for s in stores if s.region == region)
        ack = self.publish_card(channel, kind, text="New price labels from Monday")
        if ack is not None:
            self.unchecked.append((time.monotonic(), channel, ack.seq, audience))

    def count_readers(self) -> None:
        """Ask the relay how many users have read each announcement older than READ_GRACE."""
        while self.unchecked and time.monotonic() - self.unchecked[0][0] >= READ_GRACE:
            _, channel, seq, audience = self.unchecked.popleft()
            result = self.control(FrameType.CURSOR, "readers",
                                  {"op": "readers", "channel": channel, "seq": seq})
            if result is not None:
                # A store that attached later may have read past seq too: count at most N.
                READERS.update(read=min(int(result["read"]), audience), expected=audience)


class Store(FenghuoUser):
    """Subscribes to its place in a chain and marks every announcement read."""

    role = "store"
    weight = 4
    wait_time = constant(0)
    inbox_kinds = frozenset({"chain_announcement", "region_announcement"})

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.region = REGIONS[self.serial % len(REGIONS)]
        self.subscribed: str | None = None

    def grants(self) -> Grants:
        return {"read": ["org.retail.>"]}

    def on_connected(self) -> None:
        self.subscribed = None   # subscriptions belong to the connection

    def on_disconnected(self) -> None:
        RETAIL.detach(self)

    @task
    def read_announcements(self) -> None:
        if not self.ensure_connected():
            return
        if RETAIL.head_of(self) is None and not self.join_chain():
            self.wait_for_partner()
            return
        item = self.next_card()
        if item is not None:
            self.mark_read(item[0], "announcement read")

    def join_chain(self) -> bool:
        """Subscribe below the least-served head office, then attach to it."""
        head = RETAIL.choose()
        if not isinstance(head, HeadOffice):
            return False
        channel = f"{head.chain}.{self.region}.{self.user_id}"
        if self.subscribed is not None and self.control(
                FrameType.UNSUBSCRIBE, "store channel", {"channel": self.subscribed}) is None:
            return False
        self.subscribed = None
        if self.control(FrameType.SUBSCRIBE, "store channel", {"channel": channel}) is None:
            return False
        self.subscribed = channel
        RETAIL.attach(self, head)
        return True


# ---------------------------------------------------------------- pairing check

SERVED_BY = {"Resident": "EstateBilling", "BankCustomer": "BankBot", "BankBot": "BankAdvisor",
             "Store": "HeadOffice"}
"""Served class -> the class that serves it (in the same process, see Roster)."""


@events.init.add_listener
def _watch_spawning(environment: Any, **_: Any) -> None:
    environment.events.spawning_complete.add_listener(
        lambda **_: _check_pairing(environment.runner))


def _check_pairing(runner: Any) -> None:
    """Log which users this process runs, and warn about users nobody here can serve."""
    if isinstance(runner, MasterRunner):
        return
    counts = {name: n for name, n in runner.user_classes_count.items() if n}
    where = f"worker {runner.worker_index}" if isinstance(runner, WorkerRunner) else "this process"
    log.info("%s runs %s", where, counts)
    for served, server in SERVED_BY.items():
        if counts.get(served) and not counts.get(server):
            log.warning("%s runs %s users but no %s to pair them with (give each worker at "
                        "least 15 users)", where, served, server)


# ---------------------------------------------------------------- "x of N read"

@events.report_to_master.add_listener
def _send_readers(client_id: str, data: dict[str, Any]) -> None:
    data["readers"] = dict(READERS)
    READERS.clear()


@events.worker_report.add_listener
def _add_readers(client_id: str, data: dict[str, Any]) -> None:
    READERS.update(data.get("readers", {}))


@events.quitting.add_listener
def _write_readers(environment: Any, **_: Any) -> None:
    """Where the stats are written (not on workers), say how many stores had read."""
    if isinstance(environment.runner, WorkerRunner) or not READERS["expected"]:
        return
    log.info(readers_line(READERS["read"], READERS["expected"], READ_GRACE))
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        with open(f"{prefix}_readers.json", "wb") as f:
            f.write(orjson.dumps({**READERS, "grace_s": READ_GRACE,
                                  "distributed": isinstance(environment.runner, MasterRunner)}))
