"""Retail: head office broadcasts to every store under an org prefix, stores receive,
read and click, and head office asks who has not read it.

    python examples/retail.py        (with the relay of examples/README.md running)
"""

from __future__ import annotations

import asyncio
import json

from _relay import api, connect

STORES = ["store-east-1", "store-east-2", "store-west-1"]


async def main() -> None:
    async with api() as office:
        # Each store's token lets it read its own channel; a broadcast to an
        # ancestor (org.shop) reaches everyone subscribed below it.
        east1, west1 = [await connect(office, s, read=[f"org.shop.{s.split('-')[1]}.{s}"])
                        for s in ("store-east-1", "store-west-1")]   # store-east-2 is closed today
        ack = await office.publish("org.shop", {"title": "Spring sale from Monday",
                                                "links": {"poster": "https://shop.example/p"}},
                                   sender="head-office", idempotency_key="spring-sale")
        seq = ack["seq"]
        print(f"head office broadcast announcement {seq} to org.shop")

        for name, store in (("store-east-1", east1), ("store-west-1", west1)):
            message = await store.next_message(timeout=10)
            print(f"{name} received: {json.loads(message.payload)['title']}")
        await east1.mark_read("org.shop", seq)                 # east-1 opens it...
        print("store-east-1 clicked:", await east1.click("org.shop", seq, "poster"))  # ...and taps the poster
        await west1.mark_delivered("org.shop", seq)            # west-1 only has it on the device

        # An org channel has no member list: head office names its stores.
        for _ in range(50):
            status = await office.message_status("org.shop", seq, users=STORES, filter="not_read")
            if status["counts"]["read"] == 1 and status["counts"]["delivered"] == 2:
                break
            await asyncio.sleep(0.1)
        print("counts:", status["counts"], "clicks per link:", status["links"])
        print("stores that have not read it:", [u["user"] for u in status["users"]])
        for store in (east1, west1):
            await store.close()


asyncio.run(main())
