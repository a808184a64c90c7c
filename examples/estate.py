"""Estate office: a fee reminder with an itemised bill card, scheduled a few seconds ahead
and escalated when a resident has not read it; the escalation reaches the office's
webhook receiver, which "sends an SMS" (prints it); then a payment confirmation.

    python examples/estate.py      (with the relay of examples/README.md running, whose
                                    --webhooks file points at http://127.0.0.1:8089/sms)
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from aiohttp import web

from _relay import api, connect, next_from
from fenghuo.webhooks import WebhookVerificationError, verify

SMS_PORT = int(os.environ.get("SMS_PORT", "8089"))
# The secret the relay signs webhooks with (the hooks.toml endpoint's), read once.
with open(os.environ.get("HOOK_SECRET_FILE", "hook-secret")) as f:
    HOOK_SECRET = f.read().strip()
sent_sms: list[str] = []


async def sms_gateway(request: web.Request) -> web.Response:
    """The webhook receiver: an escalation becomes an SMS to the resident."""
    body = await request.read()
    try:
        event = verify(HOOK_SECRET, request.headers, body)
    except WebhookVerificationError as exc:
        return web.Response(status=400, text=str(exc))
    if event["type"] == "escalation":
        data = event["data"]
        sent_sms.append(data["recipient"])
        print(f"SMS to {data['recipient']}: you have an unread bill ({data['channel']} #{data['seq']})")
    return web.Response(status=204)


async def main() -> None:
    app = web.Application()
    app.router.add_post("/sms", sms_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", SMS_PORT).start()

    async with api() as office:
        flat = f"flat-{uuid.uuid4().hex[:6]}"
        await office.group_create(flat, "office", ["resident-a", "resident-b"], title="Flat 12")
        channel = f"group:{flat}"
        a = await connect(office, "resident-a")
        bill = {"title": "March fees", "total": 182.5, "currency": "CNY",
                "items": [{"what": "management", "amount": 120.0},
                          {"what": "water", "amount": 38.5}, {"what": "lift", "amount": 24.0}],
                "links": ["pay"]}
        # Sent in 2 s; whoever has not read it 1 s later is escalated.
        scheduled = await office.call("publish", {
            "channel": channel, "data": bill, "sender": "office", "send_at": int(time.time()) + 2,
            "escalate": [{"if_not": "read", "after_s": 1}], "idempotency_key": f"{flat}-03"})
        print("reminder scheduled:", scheduled)
        reminder = await next_from(a, "office")
        print(f"resident-a got the bill: {reminder.text}")
        await a.mark_read(channel, reminder.seq)        # resident-b never opens the app
        await a.click(channel, reminder.seq, "pay")

        for _ in range(100):                            # the escalation fires after 1 s
            status = await office.message_status(channel, reminder.seq)
            if status["counts"]["escalated"] and sent_sms:
                break
            await asyncio.sleep(0.1)
        print("status:", status["counts"], [(u["user"], u["status"], u["escalated"])
                                            for u in status["users"]])
        if not sent_sms:
            print("no SMS: was the relay started with the --webhooks file of examples/README.md?")

        # The payment system confirms the moment the money arrives.
        await office.publish(channel, "Payment of 182.5 CNY received, thank you", sender="office")
        print("resident-a:", (await next_from(a, "office")).text)
        await a.close()
    await runner.cleanup()


asyncio.run(main())
