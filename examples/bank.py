"""Bank: a bot answers a customer, then hands the conversation to an advisor,
who reads the whole history at once.

    python examples/bank.py        (with the relay of examples/README.md running)
"""

from __future__ import annotations

import asyncio
import uuid

from _relay import api, connect, next_from

ANSWERS = {"balance": "Your balance is shown under Accounts > Overview.",
           "card": "I have blocked the card. Do you want to talk to an advisor?"}


async def main() -> None:
    async with api() as bank:
        # One conversation = one group, owned by the bank's backend.
        chat = f"chat-{uuid.uuid4().hex[:8]}"
        await bank.group_create(chat, "bank", ["customer", "bankbot"], title="Support")
        channel = f"group:{chat}"
        customer = await connect(bank, "customer")
        bot = await connect(bank, "bankbot")

        for question in ("card", "yes please, a person"):
            await customer.publish(channel, question)
            asked = await next_from(bot, "customer")
            answer = ANSWERS.get(asked.text)
            print(f"customer: {asked.text}")
            if answer is None:                     # the bot cannot help: hand off
                break
            await bot.publish(channel, answer)
            print(f"bankbot:  {answer}")
            await next_from(customer, "bankbot")

        handed = await bank.handoff(chat, "bank", "advisor-li", remove=["bankbot"],
                                    note="card blocked; customer wants a person")
        print(f"handed over to advisor-li (event seq {handed['seq']}), removed {handed['removed']}")

        advisor = await connect(bank, "advisor-li")
        print("advisor-li reads the conversation from the start:")
        for m in await advisor.history(channel, after=0):
            print(f"  {m.seq:>2} {m.sender:<10} {m.text}")
        await advisor.publish(channel, "Hello, I am Li. I will send you a new card today.")
        print("customer got:", (await next_from(customer, "advisor-li")).text)
        for client in (customer, bot, advisor):
            await client.close()


asyncio.run(main())
