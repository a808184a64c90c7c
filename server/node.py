"""The node: one relay process's lifecycle.

Start: the mesh or the cluster (several workers or nodes), the store's writer
and retention, the client port and the WebSocket gateway, the background
sweeps.  Stop (SIGTERM/SIGINT, or a store failure): GOAWAY to every client,
what is owed answered, then the store closed.  What runs in between is the
relay's (server/relay.py) and its concerns'.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from fenghuo.core import LINGER_S, FrameType, lighten_transport_table
from fenghuo.protocol import encode_json
from fenghuo.server import retention
from fenghuo.server.mesh import boot_id
from fenghuo.server.stalls import Collector, LoopLag, loop_slice

if TYPE_CHECKING:
    from collections.abc import Callable

    from fenghuo.server.mesh import WorkerSpec
    from fenghuo.server.relay import Relay
    from fenghuo.server.session import Session

log = logging.getLogger("fenghuo.relay")

# The least a cluster node is given to leave the cluster (NodeCluster.stop) when
# the rest of the shutdown took its whole drain timeout: a few NATS round trips,
# so that a node whose NATS answers still leaves no consumer behind.
LEAVE_S = 1.0


class Node:
    """Starts and stops one :class:`Relay`: its listeners, tasks, mesh and store."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.started_at = time.time()
        self.shutting_down = False
        #: set by SIGTERM/SIGINT (see main.serve) or by a store failure
        self.stop_requested = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._ws_server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._revoker: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        #: what holds the loop up, for /metrics: its lag and the collector's pauses
        self.loop_lag = LoopLag()
        self.collector = Collector()
        #: the time slice the kernel gives the loop's thread, seconds (0: it does not say)
        self.loop_slice = 0.0

    def _on_batch(self, batch: list[Any] | None) -> None:
        if batch is None:
            log.critical("store failed: the relay can no longer persist messages; shutting down")
            self.stop_requested.set()
            return
        self.relay.hub.release(batch)
        assert self.relay.store is not None
        self.relay.store.written(len(batch))

    def _store_pressure(self, high: bool) -> None:
        """Stop reading from every client while the store's writer is far behind."""
        log.debug("store backlog %s: %s reading", self.relay.store.backlog if self.relay.store else 0,
                  "pausing" if high else "resuming")
        self.set_reading(not high)

    def set_reading(self, on: bool) -> None:
        """Resume or pause reading on every open client connection."""
        for conn in self.relay.hub.connections:
            if conn.transport is not None and not conn.closing:
                (conn.transport.resume_reading if on else conn.transport.pause_reading)()

    async def start(self, spec: WorkerSpec | None = None) -> None:
        """Listen; as worker ``spec.index`` of several when ``spec`` is given."""
        from fenghuo.server.cluster import Cluster

        loop = asyncio.get_running_loop()
        if self.relay.settings.cluster:
            # Each worker of a node is a participant of the cluster (DESIGN, Cluster).
            from fenghuo.server.node_cluster import NodeCluster
            self.relay.cluster = node = await NodeCluster.join(self.relay, spec)
            # One store id for the whole cluster: a client moving between
            # nodes keeps its positions (PROTOCOL §6.6).
            self.relay.epoch = f"{node.cluster_id}.{boot_id(8)}"
        elif spec is not None:
            self.relay.cluster = Cluster.of_worker(self.relay, spec)
            self.relay.cluster.start()
        if self.relay.store is not None:
            self.relay.store.on_pressure = self._store_pressure
            self.relay.store.start(loop, self._on_batch)
        # Once this worker knows what it owns, before it listens.
        self.relay.warm_windows()
        rules = retention.parse_rules(self.relay.settings.retention)
        if any(rule.seconds is not None for rule in rules):
            # One worker deletes from the shared store; each trims its own rings
            # (all there is under --store memory).  A cluster node's store purges
            # the stream when it is the one to (server/cluster_store.py), and
            # always deletes its own clicks.
            expires = self.relay.cluster is None or self.relay.cluster.index == 0 \
                or self.relay.shared_state is not None
            self._retention = asyncio.create_task(retention.run_forever(
                self.relay.sqlite if expires else None, rules, self.relay.settings.retention_interval,
                lambda: list(self.relay.hub.channels.values()), self.relay.clicks), name="fenghuo-retention")
        # uvloop's table of the loop's transports, in C (core/transports.pyx).
        lighten_transport_table(loop)
        self._server = await loop.create_server(
            self.relay.admission.protocol_factory(
                self.new_session, made_after_handshake=self.relay.tls is not None),
            self.relay.settings.host, self.relay.settings.port,
            backlog=self.relay.settings.backlog, reuse_address=True,
            ssl=self.relay.tls.context if self.relay.tls is not None else None,
            ssl_handshake_timeout=self.relay.settings.handshake_timeout if self.relay.tls is not None else None,
            # A TLS close is TLS's half-close: close_notify after the last frame, then
            # read and discard until the client's close_notify, as long as a TCP
            # close lingers (LINGER_S; the loop's default waits 30 s).
            ssl_shutdown_timeout=LINGER_S if self.relay.tls is not None else None,
            # Several workers accept on one port; the kernel spreads connections.
            reuse_port=spec is not None,
        )
        if self.relay.settings.ws_port:
            from fenghuo.server import gateway
            self._ws_server = await gateway.start(
                self.relay, self.new_session,
                reuse_port=spec is not None)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fenghuo-sweeper")
        self.loop_slice = loop_slice(self.relay.settings.loop_slice_us)
        self.loop_lag.start()
        self.collector.start(self.relay.settings.gc_young_threshold)
        if self.relay.tokens.revocations is not None:
            self._revoker = asyncio.create_task(self._revoke_forever(), name="fenghuo-revocations")
        log.info("listening", extra={"host": self.relay.settings.host, "port": self.port,
                                     "ws_port": self.ws_port,
                                     "epoch": self.relay.epoch, "backlog": self.backlog,
                                     "max_connections": self.relay.admission.max_connections})

    @functools.cached_property
    def new_session(self) -> Callable[[], Session]:
        """Makes a client connection's Session (TCP, TLS, WebSocket, or the server API's
        own socket pairs, server/backends.py), made here so that no module it imports
        needs to import it back.  A partial, called in C: no Python frame per connect."""
        # Imported once, not per connection: an import statement of a loaded
        # module still goes through importlib's machinery (callgrind: 7,000 of
        # the 190,000 instructions a connect + HELLO took).
        from fenghuo.server.session import Session
        return functools.partial(Session, self.relay.hub, self.relay)

    @property
    def backlog(self) -> int:
        """The effective listen backlog: the kernel caps the asked one at net.core.somaxconn."""
        try:
            with open("/proc/sys/net/core/somaxconn") as f:
                return min(self.relay.settings.backlog, int(f.read()))
        except (OSError, ValueError):
            return self.relay.settings.backlog

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ws_port(self) -> int | None:
        """The WebSocket port listened on, None when the gateway is off."""
        if self._ws_server is None:
            return None
        port: int = self._ws_server.sockets[0].getsockname()[1]
        return port

    async def _answer_what_is_owed(self, deadline: float) -> None:
        """Stop reading from clients and let acks waiting for the disk (a cluster
        node's: for the stream) go out until ``deadline`` (monotonic)."""
        self.set_reading(False)
        if self.relay.store is None:
            return
        try:
            await asyncio.wait_for(self.relay.released(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("store did not drain within the drain timeout")

    async def _sweep_forever(self) -> None:
        s = self.relay.settings
        interval = max(0.05, min(s.handshake_timeout, s.ping_interval, s.idle_timeout,
                                 s.request_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            self.relay.hub.sweep(s.handshake_timeout, s.ping_interval, s.idle_timeout)
            self.relay.tokens.close_expired(len(self.relay.hub.connections))
            self.relay.admission.sweep()
            if self.relay.cluster is not None:
                now = time.monotonic()
                self.relay.cluster.sweep(now)
                self.relay.cluster.expire(now)

    async def _revoke_forever(self) -> None:
        while True:
            await asyncio.sleep(self.relay.settings.revocation_interval)
            try:
                # The relay's hub holds nothing but the Sessions it made.
                self.relay.tokens.close_revoked(cast("set[Session]", self.relay.hub.connections))
            except Exception:   # a busy or broken store: revocations wait for the next round
                log.exception("reading token revocations failed")

    async def shutdown(self) -> None:
        """Stop accepting, tell every client GOAWAY, wait for them to leave, close the rest.

        All of it within the drain timeout, a cluster node's leaving the cluster
        included (at least :data:`LEAVE_S`, whether or not NATS answers): a
        service manager's stop timeout bounds it (PROTOCOL §3.20)."""
        if self.shutting_down:
            return
        self.shutting_down = True
        deadline = time.monotonic() + self.relay.settings.drain_timeout
        log.info("shutting down", extra={"connections": len(self.relay.hub.connections)})
        for server in (self._server, self._ws_server):
            if server is not None:
                server.close()
        self.relay.admission.abort_lingering()
        await self._answer_what_is_owed(deadline)
        goaway = encode_json(FrameType.GOAWAY, {"reason": "shutdown", "reconnect_after_ms": 1000})
        for conn in list(self.relay.hub.connections):
            conn.close(goaway)
        while self.relay.hub.connections and time.monotonic() < deadline:
            for conn in list(self.relay.hub.connections):
                transport = conn.transport
                if (transport is not None and not transport.is_closing()
                        and transport.get_write_buffer_size() == 0):
                    # GOAWAY and the FIN after it are written: lingering for
                    # the client's own close would only hold the shutdown up.
                    transport.close()
            await asyncio.sleep(0.05)
        left_behind = list(self.relay.hub.connections)
        for conn in left_behind:
            if conn.transport is not None:
                conn.transport.abort()
        for task in (self._sweeper, self._retention, self._revoker):
            if task is not None:
                task.cancel()
        self.loop_lag.stop()
        self.collector.stop()
        if self.relay.cluster is not None:
            await self.relay.cluster.stop(max(LEAVE_S, deadline - time.monotonic()))
        if self.relay.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.relay.store.close)
        log.info("stopped", extra={"left_behind": len(left_behind)})
