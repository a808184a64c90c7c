"""``fenghuo serve``: run the relay until SIGTERM or SIGINT.

With ``--workers 1`` this process is the relay.  With more, it becomes the
supervisor (server/supervisor.py) of that many worker processes, each this
same command with ``FENGHUO_WORKER`` set, joined by the mesh (server/mesh.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
from typing import TYPE_CHECKING

import uvloop
from fenghuo.server import logs, metrics
from fenghuo.server.config import Settings
from fenghuo.server.mesh import WorkerSpec, new_boot_id
from fenghuo.server.outbox import reload_endpoints
from fenghuo.server.stalls import hold_collections
from fenghuo.server.supervisor import EXIT_STOP_RELAY
from fenghuo.server.tls import ServerTLS

from fenghuo.tokens import TokenError, keyring, resolve_secret

if TYPE_CHECKING:
    from fenghuo.server.api import Api
    # Imported by serve(): a supervisor runs no relay, and the import would
    # delay the start of its workers by as long as one of theirs.
    from fenghuo.server.relay import Relay

log = logging.getLogger("fenghuo.serve")


async def serve(settings: Settings, secret: str, spec: WorkerSpec | None = None) -> int:
    from fenghuo.server.relay import Relay
    relay = Relay(settings, secret)
    api = None
    # One process serves the API and fires the scheduled messages (of the API and of
    # SCHEDULE, which the other workers forward to it): the relay itself, or worker 0.
    # Made before the relay listens, so a SCHEDULE finds it from the first connection.
    if spec is None or spec.index == 0:
        from fenghuo.server.api import Api, load_key_hashes
        api = Api(relay, secret, load_key_hashes(settings.api_key_file) if settings.api_port
                  else ())
        relay.api = api
    # Before the relay listens: a SIGTERM from then on is a drain (GOAWAY, acks owed
    # go out), never the default action, which would drop clients it has accepted.
    # One that comes while it starts stops it as soon as it has started.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.node.stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, reload, relay, api)
    await relay.node.start(spec)
    metrics_server = None
    # A worker's metrics port is its supervisor's choice (metrics port + 1 + index).
    metrics_port = int(os.environ.get("FENGHUO_METRICS_PORT", "0")) if spec else settings.metrics_port
    if metrics_port:
        metrics_server = await metrics.start(relay, settings.host, metrics_port)
    if api is not None:
        await api.start(settings.api_host, settings.api_port)
    # One process sends webhooks, the same one: the rows of every worker are in the shared store.
    if relay.endpoints and relay.sqlite is not None and (spec is None or spec.index == 0):
        from fenghuo.server.webhooks import WebhookSender
        relay.webhooks = WebhookSender(settings, relay.sqlite, relay.endpoints)
        await relay.webhooks.start()
    who = f"worker {spec.index} of {spec.count} " if spec else ""
    print(f"fenghuo {who}listening on {settings.host}:{relay.node.port}"
          + (f", websocket on :{relay.node.ws_port}" if relay.node.ws_port else "")
          + (f", metrics on :{metrics_port}" if metrics_server else "")
          + (f", API on {settings.api_host}:{settings.api_port}" if settings.api_port and api else ""), flush=True)
    await relay.node.stop_requested.wait()
    if api is not None:
        await api.stop()
    if relay.webhooks is not None:
        await relay.webhooks.stop()
    await relay.node.shutdown()
    if metrics_server is not None:
        metrics_server.close()
    if relay.store is None or relay.store.failure is None:
        return 0
    # A store failure is not a clean stop: let a supervisor see it (ours stops
    # the relay rather than restart a worker into the same full disk).
    return EXIT_STOP_RELAY if spec is not None else 1


def reload(relay: Relay, api: Api | None) -> None:
    """SIGHUP: read the TLS certificate, the secret file and the webhooks file again;
    each keeps what it had on failure."""
    if relay.tls is not None:
        relay.tls.reload()
    _reload_secret(relay, api)
    _reload_webhooks(relay)


def _reload_secret(relay: Relay, api: Api | None) -> None:
    path = relay.settings.secret_file
    if not path:
        return
    try:
        secret, _ = resolve_secret(None, relay.settings.data_dir, secret_file=path)
    except TokenError as exc:
        log.error("secret file reload failed; keeping the current keys",
                  extra={"file": path, "error": str(exc)})
        return
    # New HELLOs and REFRESHes verify against the new keys; sessions past HELLO are kept.
    relay.secret = secret
    if api is not None:
        api.use_secret(secret)
    log.info("secret file reloaded", extra={"file": path, "keys": [k.kid for k in keyring(secret)]})


def _reload_webhooks(relay: Relay) -> None:
    """Rotate a webhook secret (or change a url or filter) without a restart."""
    path = relay.settings.webhooks
    if not path:
        return
    try:
        endpoints = reload_endpoints(path, relay.endpoints)
    except (OSError, ValueError) as exc:     # a TOML syntax error is a ValueError
        log.error("webhooks file reload failed; keeping the current endpoints",
                  extra={"file": path, "error": str(exc)})
        return
    relay.use_endpoints(endpoints)
    log.info("webhooks file reloaded", extra={"file": path,
                                              "endpoints": [e.name for e in endpoints]})


def run(settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    spec = WorkerSpec.from_env()
    # SIGHUP reloads certificates and the secret file once serve() listens;
    # until then it must not end the process as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        ServerTLS.from_settings(settings)     # a bad certificate: one line, before any worker
    except (OSError, ssl.SSLError) as exc:
        print(f"fenghuo: cannot use the TLS certificate {settings.tls_cert}: {exc}",
              file=sys.stderr, flush=True)
        return 2
    try:
        # A worker reads a secret file itself rather than take the secret its
        # supervisor read at start: a worker restarted after a SIGHUP rotation
        # must get the keys in force, not the first ones.
        from_env = None if spec is not None and settings.secret_file else settings.secret
        secret, generated = resolve_secret(from_env, settings.data_dir, create=spec is None,
                                           secret_file=settings.secret_file)
    except TokenError as exc:
        print(f"fenghuo: {exc}", file=sys.stderr, flush=True)
        return 2
    if generated:
        print(f"fenghuo: no secret given; generated a dev secret in "
              f"{settings.data_path / 'dev-secret'}:\n  {secret}\n"
              f"  (set --secret or FENGHUO_SECRET in production)", file=sys.stderr, flush=True)
    workers = settings.workers or os.cpu_count() or 1
    if spec is None and workers > 1:
        return supervise(settings, secret, workers)
    hold_collections()
    return uvloop.run(serve(settings, secret, spec))


def supervise(settings: Settings, secret: str, workers: int) -> int:
    """Run ``workers`` copies of this command as workers, until SIGTERM or SIGINT."""
    from fenghuo.server.supervisor import Supervisor

    # Every worker gets the secret resolved here (no race on a dev secret) and
    # one boot id, so clients see one epoch whichever worker they reach.
    env = {**os.environ, "FENGHUO_SECRET": secret, "FENGHUO_BOOT": new_boot_id()}
    clash = port_clash(settings, workers)
    if clash:
        print(f"fenghuo: {clash}", file=sys.stderr, flush=True)
        return 1
    argv = sys.argv[sys.argv.index("serve") + 1:] if "serve" in sys.argv else []
    # A cluster's workers reach each other over NATS (DESIGN, "Several workers per
    # node"): their rings carry nothing, so they take one page, not 4 MiB each.
    capacity = 4096 if settings.cluster else 1 << max(22, (2 * settings.max_frame + 4096).bit_length())
    holders: list[socket.socket] = []
    # The WebSocket port is shared by the workers exactly as the TCP port is.
    for wanted in (settings.port, *((settings.ws_port,) if settings.ws_port else ())):
        try:
            holders.append(hold_port(settings.host, wanted))
        except OSError as exc:
            print(f"fenghuo: cannot listen on {settings.host}:{wanted}: {exc.strerror}",
                  file=sys.stderr, flush=True)
            for holder in holders:
                holder.close()
            return 1
    port, *ws = [holder.getsockname()[1] for holder in holders]
    try:
        print(f"fenghuo supervising {workers} workers on {settings.host}:{port}"
              + (f", websocket on :{ws[0]}" if ws else "")
              + (f", metrics on :{settings.metrics_port}" if settings.metrics_port else ""),
              flush=True)
        # Last on the command line, so they override any --port 0 before them.
        resolved = ["--port", str(port), *(("--ws-port", str(ws[0])) if ws else ())]
        # Without a store the relay's state is its workers' memories together: one
        # lost is a new epoch for all.  Under --fsync batch|off a worker killed
        # loses what it acked and had not written, and numbers those seqs again:
        # every client must learn the heads again (PROTOCOL §6.6).
        return Supervisor(ring_capacity=capacity, drain_timeout=supervisor_drain_timeout(settings),
                          metrics_port=settings.metrics_port, metrics_host=settings.host,
                          restart_together=settings.store == "memory" or settings.fsync != "always",
                          ).run([*argv, *resolved], workers, env)
    finally:
        for holder in holders:
            holder.close()


def port_clash(settings: Settings, workers: int) -> str | None:
    """Why the ports of ``workers`` workers collide, or None.

    Worker ``k`` serves its own /metrics on ``metrics_port + 1 + k``
    (server/supervisor.py): a client, WebSocket or API port among them would
    keep that worker from starting, and its supervisor restarting it forever.
    """
    if not settings.metrics_port:
        return None
    first, last = settings.metrics_port + 1, settings.metrics_port + workers
    for flag, port in (("--port", settings.port), ("--ws-port", settings.ws_port),
                       ("--api-port", settings.api_port)):
        if port and first <= port <= last:
            return (f"{flag} {port} is a worker's metrics port: under {workers} workers they "
                    f"take --metrics-port {settings.metrics_port} + 1 to + {workers} "
                    f"({first}-{last}); choose another {flag} or --metrics-port")
    return None


def supervisor_drain_timeout(settings: Settings) -> float:
    """Seconds the supervisor lets its workers drain before SIGKILL.

    5 s beyond a worker's own ``drain_timeout``: a worker also closes its
    store and its mesh after its clients have left.  A service manager's
    stop timeout must exceed this plus the supervisor's ``KILL_WAIT``
    (deploy/systemd/fenghuo.service).
    """
    return settings.drain_timeout + 5


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``(host, port)`` with SO_REUSEPORT that never listens.

    Port 0 is resolved here, once, so that every worker binds the same port.
    Held for the supervisor's whole life, it keeps the port for the workers
    (a busy port fails here, not in a restart loop; no other program and no
    outgoing connection takes it while every worker is down); not listening,
    it is handed no connection.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock
