"""``fenghuo serve``: run one relay process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from fenghuo.server import logs, metrics
from fenghuo.server.config import Settings
from fenghuo.server.relay import Relay
from fenghuo.tokens import resolve_secret

log = logging.getLogger("fenghuo.serve")


async def serve(settings: Settings, secret: str) -> int:
    relay = Relay(settings, secret)
    await relay.start()
    metrics_server = None
    if settings.metrics_port:
        metrics_server = await metrics.start(relay, settings.host, settings.metrics_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop_requested.set)
    print(f"fenghuo listening on {settings.host}:{relay.port}"
          + (f", metrics on :{settings.metrics_port}" if metrics_server else ""), flush=True)
    await relay.stop_requested.wait()
    await relay.shutdown()
    if metrics_server is not None:
        metrics_server.close()
    # A store failure is not a clean stop: let a supervisor see it.
    return 1 if relay.store is not None and relay.store.failure is not None else 0


def run(settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    secret, generated = resolve_secret(settings.secret, settings.data_dir, create=True)
    if generated:
        print(f"fenghuo: no secret given; generated a dev secret in "
              f"{settings.data_path / 'dev-secret'}:\n  {secret}\n"
              f"  (set --secret or FENGHUO_SECRET in production)", file=sys.stderr, flush=True)
    return uvloop.run(serve(settings, secret))
