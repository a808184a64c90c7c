"""The server API's HTTP server: aiohttp, serving :class:`~fenghuo.server.api.Api`.

Its own module so that aiohttp is imported only by a relay started with
``--api-port`` (:meth:`Api.start` imports this): every worker imports
server/api.py for SCHEDULE's timers, and aiohttp's import is about a third of a
worker's start (0.7 s of 2.2 s on a loaded 2-core machine, 7c95c10).  The API's
calls, keys and errors are server/api.py's; this module only carries them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from fenghuo.server.httpd import Response

log = logging.getLogger("fenghuo.api")

#: reads the request's body: its bytes, or None when it exceeds --api-max-body
BodyReader = Callable[[], Awaitable[bytes | None]]
#: answers ``POST /api/{method}``: the method's name, the Authorization header, the body
CallHandler = Callable[[str, str | None, BodyReader], Awaitable[Response]]


class ApiHttpServer:
    """``POST /api/{method}`` and ``GET /api/openapi.json`` on one listening port."""

    def __init__(self, call: CallHandler, openapi: Callable[[], Response], max_body: int) -> None:
        self.call = call
        self.openapi = openapi
        self.max_body = max_body
        self.runner: web.AppRunner | None = None

    async def start(self, host: str | None, port: int) -> int:
        """Listen on ``host:port``; the port bound (``port`` 0 picks one)."""
        app = web.Application(client_max_size=self.max_body)
        app.router.add_get("/api/openapi.json", self._openapi)
        app.router.add_post("/api/{method}", self._call)
        # lingering_time=0: a body not read to its end (over --api-max-body, or a call
        # refused before its body, 401/404) is not drained after the answer but the
        # connection closed; aiohttp's default read and dropped it for 10 s, 6.2 GB from
        # a fast loopback client (tests/test_api.py, oversized body).
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, lingering_time=0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        bound: int = self.runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _openapi(self, request: web.Request) -> web.Response:
        return _web(self.openapi())

    async def _call(self, request: web.Request) -> web.Response:
        async def read_body() -> bytes | None:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                return None

        return _web(await self.call(request.match_info["method"],
                                    request.headers.get("Authorization"), read_body))


def _web(response: Response) -> web.Response:
    return web.Response(status=response.status, body=response.body,
                        content_type=response.content_type)
