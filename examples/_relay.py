"""Where the examples find the relay (examples/README.md starts it), and a client for a user.

Tokens come from the server API's `token` method, so the examples need only the API key.
"""

from __future__ import annotations

import os

import fenghuo
from fenghuo.api import AsyncApi

API = os.environ.get("FENGHUO_API", "http://127.0.0.1:7800")
KEY = os.environ.get("FENGHUO_API_KEY", "dev-api-key")
SERVER = os.environ.get("FENGHUO_SERVER", "tcp://127.0.0.1:7700")


def api() -> AsyncApi:
    return AsyncApi(API, KEY)


async def connect(backend: AsyncApi, user: str, **claims) -> fenghuo.Client:
    """A connected client for ``user`` (a token with ``claims`` issued through the API)."""
    token = (await backend.token(user, **claims))["token"]
    return await fenghuo.Client(SERVER, token=token, reconnect=False).connect()


async def next_from(client: fenghuo.Client, sender: str) -> fenghuo.Message:
    """The next message from ``sender`` (passing over group events and the others)."""
    while True:
        message = await client.next_message(timeout=10)
        if message.sender == sender and message.content_type != fenghuo.ContentType.EVENT:
            return message
