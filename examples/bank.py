"""Bank: a bot (a service user) answers a customer, queues the conversation for an
advisor and is silenced when an advisor takes it; the advisor reads the whole
history at once; card numbers are masked; the conversation is exported, signed.

    python examples/bank.py        (with the relay of examples/README.md running)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import fenghuo
from _relay import api, connect, next_from

ANSWERS = {"card": "I have blocked the card. Do you want to talk to an advisor?"}
DATA_DIR = os.environ.get("FENGHUO_DATA_DIR", "data")      # the relay's --data-dir


async def main() -> None:
    async with api() as bank:
        # One conversation = one group, owned by the bank's backend, the bot assigned to it.
        chat = f"chat-{uuid.uuid4().hex[:8]}"
        await bank.group_create(chat, "bank", ["customer", "bankbot"], title="Support")
        channel = f"group:{chat}"
        customer = await connect(bank, "customer")
        # A service user: it acts only in the conversations it belongs to (PROTOCOL §5.6a).
        bot = await connect(bank, "bankbot", roles=["service"])

        await customer.publish(channel, "card 4111 1111 1111 1111 was swallowed by an ATM")
        asked = await next_from(bot, "customer")
        print(f"bankbot sees: {asked.text}")          # masked by the relay's --mask rule
        answer = ANSWERS["card"]
        await bot.publish(channel, answer)
        print(f"bankbot:  {answer}")
        await next_from(customer, "bankbot")
        await customer.publish(channel, "yes please, a person")
        print(f"customer: {(await next_from(bot, 'customer')).text}")
        try:
            await bot.send("customer", "a private word")
        except fenghuo.FenghuoError as exc:
            print(f"bankbot may not leave its conversations: {exc.message}")

        # The bot cannot help: it queues the conversation, to be silenced when it is taken.
        await bot.queue_for_advisor(chat, silence=["bankbot"], note="card blocked; wants a person")
        waiting = await until(lambda: queued(bank, chat))
        print("waiting for an advisor:", [(w["group"] == chat, w["by"], w["note"]) for w in waiting])

        advisor = await connect(bank, "advisor-li", roles=["advisor"])
        taken = await until(lambda: take(advisor))
        print(f"advisor-li took it (handoff event seq {taken['seq']}), silenced {taken['silenced']}")
        # The bot learns it from the stream: the handoff event (its worker then knows too).
        while (m := await bot.next_message(timeout=10)).seq < taken["seq"]:
            pass
        print(f"bankbot sees the event: {m.text}")
        try:
            await bot.publish(channel, "anything else?")
        except fenghuo.FenghuoError as exc:
            print(f"bankbot is now a reader: {exc.message}")

        print("advisor-li reads the conversation from the start:")
        for m in await advisor.history(channel, after=0):
            if m.content_type != fenghuo.ContentType.EVENT:
                print(f"  {m.seq:>2} {m.sender:<10} {m.text}")
        await advisor.publish(channel, "Hello, I am Li. I will send you a new card today.")
        print("customer got:", (await next_from(customer, "advisor-li")).text)
        print("bankbot, reading along, got:", (await next_from(bot, "advisor-li")).text)
        for client in (customer, bot, advisor):
            await client.close()
    export(channel)


async def until(attempt, patience: float = 5.0):
    """``attempt()``'s first answer that is not None.  Under several workers a queue
    change reaches the other workers within about a live delivery's time
    (PROTOCOL §3.16a): the API's list, or the advisor's worker, may not have it yet."""
    deadline = asyncio.get_running_loop().time() + patience
    while (answer := await attempt()) is None:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the queue did not change")
        await asyncio.sleep(0.05)
    return answer


async def queued(bank, chat: str) -> list[dict] | None:
    waiting = (await bank.queue_list())["waiting"]
    return waiting if any(w["group"] == chat for w in waiting) else None


async def take(advisor: fenghuo.Client) -> dict | None:
    """The next waiting conversation, taken; None while none is waiting (NOT_FOUND)."""
    try:
        return await advisor.take_conversation()
    except fenghuo.FenghuoError as exc:
        if exc.code != fenghuo.ErrorCode.NOT_FOUND:
            raise
        return None


def export(channel: str) -> None:
    """The compliance record: the conversation as signed JSON lines, then verified."""
    fenghuo_cli = [sys.executable, "-m", "fenghuo"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "conversation.jsonl"
        subprocess.run([*fenghuo_cli, "export", "--data-dir", DATA_DIR, "--channel", channel,
                        "--out", str(out)], check=True)
        lines = out.read_text().splitlines()
        print(f"export: {len(lines) - 2} messages, then its summary and signature; "
              f"card number in clear: {'4111 1111 1111 1111' in out.read_text()}")
        verified = subprocess.run([*fenghuo_cli, "export", "--data-dir", DATA_DIR, "--verify",
                                   str(out)], check=True, capture_output=True, text=True)
        print(verified.stdout.strip())


asyncio.run(main())
