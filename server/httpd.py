"""One small HTTP/1.1 server for ``/metrics`` and ``/healthz``, the relay's and the supervisor's.

A route is a path and a coroutine that makes the response; any other path
is 404, a query string is ignored, and every connection is closed after one
answer (``Connection: close``).  Garbage, a request that never ends its
head, or a client that leaves are dropped without a word: this port is for
scrapers and health checks, which send one well-formed GET.  ``scrape`` is
the client side, what the supervisor uses to ask its workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("fenghuo.httpd")

# Seconds a client has to send its request head, and a scrape to be answered.
REQUEST_TIMEOUT = 5.0
SCRAPE_TIMEOUT = 2.0

_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes


Route = Callable[[], Awaitable[Response]]
NOT_FOUND = Response(404, "text/plain", b"not found\n")


def metrics_response(collector: Collector) -> Response:
    """``collector``'s metrics in the Prometheus text format 0.0.4."""
    return Response(200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(collector))


def json_response(status: int, body: bytes) -> Response:
    return Response(status, "application/json", body)


async def start(host: str, port: int, routes: Mapping[str, Route]) -> asyncio.AbstractServer:
    """Serve ``routes`` on ``host:port`` until the returned server is closed."""
    server = await asyncio.start_server(partial(_handle, routes), host, port, reuse_address=True)
    log.info("metrics listening", extra={"host": host, "port": server.sockets[0].getsockname()[1]})
    return server


async def _handle(routes: Mapping[str, Route], reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        parts = head.split(b" ", 2)
        path = parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) == 3 else ""
        route = routes.get(path)
        response = await route() if route is not None else NOT_FOUND
        writer.write(f"HTTP/1.1 {response.status} {_REASONS[response.status]}\r\n"
                     f"Content-Type: {response.content_type}\r\n"
                     f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n".encode()
                     + response.body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def scrape(host: str, port: int, path: str = "/metrics",
                 timeout: float = SCRAPE_TIMEOUT) -> str | None:
    """The body of ``GET path`` from ``host:port``; None unless it answers 200 in time."""
    answer = await fetch(host, port, path, timeout)
    return answer[1] if answer is not None and answer[0] == 200 else None


async def fetch(host: str, port: int, path: str,
                timeout: float = SCRAPE_TIMEOUT) -> tuple[int, str] | None:
    """The status and body of ``GET path`` from ``host:port``; None without an
    HTTP answer in time (a 503 /healthz still says why)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                             f"Connection: close\r\n\r\n".encode())
                response = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        return None
    return int(status[1]), body.decode(errors="replace")
