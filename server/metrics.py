"""The relay's ``/metrics`` (prometheus-client, a collector over the core's counters) and ``/healthz``.

Nothing is counted here: the counters live where the work is (the Cython
``Metrics`` of the hub, the API's stats, the stall instruments), and
:class:`RelayCollector` reads them when scraped.  Names follow Prometheus'
conventions: a ``fenghuo_`` prefix, base units (seconds, bytes) spelled
last before ``_total``, counters ending ``_total``, a ``fenghuo_build_info``.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fenghuo import __version__
from fenghuo.server import httpd
from fenghuo.server.cluster import Cluster
from fenghuo.server.stalls import BOUNDS
from fenghuo.server.store import MAX_BATCH, SQLiteStore

if TYPE_CHECKING:
    # Not at run time: it needs nats-py, which only a cluster node has.
    from fenghuo.server.node_cluster import NodeCluster
    from fenghuo.server.relay import Relay

# (Metrics.snapshot() key, metric name without _total, help)
_COUNTERS = (
    ("frames_in", "fenghuo_frames_received", "Frames received from clients."),
    ("bytes_in", "fenghuo_received_bytes", "Bytes received from clients."),
    ("frames_out", "fenghuo_frames_sent", "Frames written to clients."),
    ("bytes_out", "fenghuo_sent_bytes", "Bytes written to clients."),
    ("writes", "fenghuo_writes", "Coalesced writes (at most one per connection per loop iteration, "
                                  "besides a WELCOME written at once)."),
    ("publishes", "fenghuo_messages_published", "Messages sequenced."),
    ("duplicates", "fenghuo_publish_duplicates", "Publishes answered from the idempotency window."),
    ("key_lookups", "fenghuo_publish_key_lookups",
     "Idempotency keys confirmed in the store by seq: ones a full window gave up before their span was over."),
    ("deliveries", "fenghuo_deliveries", "Message frames queued to subscribers, live or caught up."),
    ("slow_consumers", "fenghuo_slow_consumer_disconnects", "Connections cut for exceeding max_pending."),
    ("rate_limited", "fenghuo_rate_limited_disconnects", "Connections cut for exceeding the frame rate."),
)


def build_info() -> GaugeMetricFamily:
    """``fenghuo_build_info{version, python}`` 1: which build answers (the relay and the supervisor)."""
    family = GaugeMetricFamily("fenghuo_build_info", "The running build: fenghuo's and Python's versions.",
                               labels=("version", "python"))
    family.add_metric((__version__, platform.python_version()), 1)
    return family


def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, value=value)


def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, value=value)


def labelled_counter(name: str, help_: str, label: str,
                     counts: Iterable[tuple[object, float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_, labels=(label,))
    for key, count in counts:
        family.add_metric((str(key),), count)
    return family


def histogram(name: str, help_: str, bounds: Sequence[float], series: Iterable[tuple[tuple[str, ...],
              Sequence[int], float]], labels: Sequence[str] = ()) -> HistogramMetricFamily:
    """A histogram from per-bucket counts (the last one above every bound) and their sum."""
    family = HistogramMetricFamily(name, help_, labels=labels)
    for values, counts, total in series:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(floatToGoString, bounds), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(values, buckets, total)
    return family


class RelayCollector(Collector):
    """Every metric of one relay process, read from where it is counted when scraped."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        relay = self.relay
        snap = relay.hub.metrics.snapshot()
        yield build_info()
        yield gauge("fenghuo_start_time_seconds", "When the relay started, in seconds since the epoch.",
                    relay.node.started_at)
        yield gauge("fenghuo_connections", "Open client connections.", len(relay.hub.connections))
        yield gauge("fenghuo_handshakes", "Connections accepted and not yet past HELLO.",
                    relay.admission.handshaking)
        yield gauge("fenghuo_users_online", "Users with at least one authenticated connection.",
                    len(relay.users))
        yield gauge("fenghuo_channels", "Channels held in memory.", len(relay.hub.channels))
        yield counter("fenghuo_dedupe_keys_loaded", "Idempotency keys read from the store into "
                      "the dedupe windows of the channels sequenced here, before listening.",
                      relay.keys_loaded)
        yield gauge("fenghuo_token_deadlines", "Token deadlines kept for the expiry sweep: one per "
                    "authenticated connection, plus stale ones of closed or refreshed connections "
                    "until a sweep finds them as many as the open ones (and 64).", relay.tokens.deadlines)
        yield from self._cluster()
        yield from self._api()
        yield from self._webhooks()
        progress = relay.progress
        yield counter("fenghuo_status_delivered", "Messages that reached a device of a user, summed "
                      "over users: delivery cursors moved by CURSOR sync and receipts (5 to 9 counts 4).",
                      progress.delivered)
        yield counter("fenghuo_status_read", "Messages read, summed over users: read cursors moved "
                      "by READ receipts.", progress.read)
        yield counter("fenghuo_status_escalated", "Escalations fired: one per recipient per step of a "
                      "delivery policy.", progress.escalated)
        yield counter("fenghuo_status_clicked", "First clicks: a user following a link of a message "
                      "for the first time (CLICKED receipts).", progress.clicked)
        yield counter("fenghuo_status_clicks", "CLICKED receipts accepted, repeats included.",
                      progress.clicks)
        yield from relay.masking.collect()
        yield from self._timers()
        yield from self._store()
        for key, name, help_ in _COUNTERS:
            yield counter(name, help_, snap[key])
        yield labelled_counter("fenghuo_errors", "ERROR frames sent, by protocol error code.", "code",
                               sorted(snap["errors"].items()))
        yield histogram("fenghuo_publish_to_deliver_seconds",
                        "From a PUBLISH read off the socket to its frames handed to the kernel.",
                        snap["latency_bounds"], [((), snap["latency_counts"], snap["latency_sum"])])
        yield from self._stalls()

    def _cluster(self) -> Iterator[Metric]:
        cluster = self.relay.cluster
        if not isinstance(cluster, Cluster):
            return                # alone (None): no mesh to count
        yield gauge("fenghuo_remote_origins", "Other workers' connections this worker has answered "
                    "for (as a channel owner).", len(cluster.remote))
        yield gauge("fenghuo_forwarded_waiting", "Local connections with requests forwarded to other "
                    "workers and unanswered.", len(cluster.forwarded))
        yield gauge("fenghuo_replica_channels", "Channels other workers own that this worker "
                    "receives (its sessions asked).", len(cluster.ready_here))
        yield counter("fenghuo_replica_messages", "Messages other workers sequenced and sent here "
                      "for this worker's sessions.", cluster.replica_messages)
        receiver = cluster.receiver
        if receiver is not None:
            # compiled: M, P and A records taken in C; handed_over: every other
            # record (controls) and those C could not take as they stood.
            yield labelled_counter("fenghuo_mesh_records", "Records drained from the other "
                                   "workers' rings, by where they were handled.", "handling",
                                   [("compiled", receiver.applied + receiver.sequenced
                                                  + receiver.answered),
                                    ("handed_over", receiver.handed_over)])
        if getattr(cluster, "engine", None) is not None:    # a node of a NATS cluster
            yield from self._node(cast("NodeCluster", cluster))

    @staticmethod
    def _node(node: NodeCluster) -> Iterator[Metric]:
        """A cluster node's state (docs/DESIGN.md, Cluster: operations)."""
        yield gauge("fenghuo_cluster_engine_connected", "1 while the node is connected to NATS "
                    "(JetStream and the other nodes), else 0.", int(node.engine.nc.is_connected))
        yield gauge("fenghuo_cluster_peers_alive", "Other nodes heard from within the lease.",
                    sum(node.liveness.alive(i) for i in node.liveness.peers))
        yield gauge("fenghuo_cluster_channels_owned", "Channels this node sequences.",
                    node.store.owned)
        yield counter("fenghuo_cluster_appends", "Messages JetStream acknowledged from this "
                      "node.", node.store.appended)
        yield counter("fenghuo_cluster_stream_appends", "Stream appends (round trips) that stored "
                      "them: one holds every message of its channel sequenced while the one "
                      "before was in flight.", node.store.appends)
        yield counter("fenghuo_cluster_appends_refused", "Appends the stream refused: this node "
                      "had been deposed (fencing).", node.store.refused)
        yield counter("fenghuo_cluster_failovers", "Channels this node took over from a dead or "
                      "deposed node (claim epoch above 1).", node.failovers)
        yield counter("fenghuo_cluster_forwarded_publishes", "Publishes of this node's clients sent "
                      "to the node sequencing their channel.", node.forwarded_publishes)
        yield counter("fenghuo_cluster_forwards_deferred", "Publishes and requests other nodes "
                      "forwarded while this node was still claiming or taking over their "
                      "channel, served once it did.", node.forwards_deferred)
        yield counter("fenghuo_cluster_parked_sent_on_watch", "Publishes and requests waiting "
                      "here for their channel's owner sent to it as soon as the claims' watch "
                      "named it, before this node's own claim or lookup ended.",
                      node.parked_sent_on_watch)
        yield counter("fenghuo_cluster_first_writes", "New channels whose first append this "
                      "node sent beside its claim, not after it.", node.first_writes)
        yield counter("fenghuo_cluster_first_writes_refused", "Of them, first appends the stream "
                      "refused (another node's first message was stored): their publishes "
                      "were sent again to the channel's owner.", node.first_writes_refused)
        yield counter("fenghuo_cluster_publishes_redriven", "Publishes this node sent itself as "
                      "their channel's owner that came back unstored and were sent to the "
                      "owner again (never acked here).", node.publishes_redriven)
        yield counter("fenghuo_cluster_chats_received_unasked", "New direct chats this node "
                      "received from their owner's announcement, without asking for them.",
                      node.chats_received_unasked)
        yield counter("fenghuo_cluster_leader_stepdowns", "Streams this node asked to step "
                      "down to move their leader to --stream-leader (server/stream_leader.py).",
                      node.leaders.stepdowns if node.leaders is not None else 0)
        yield counter("fenghuo_cluster_replica_holes_filled", "Messages lost on the way from "
                      "their owner (core NATS) and read from the stream instead.",
                      node.holes_filled)
        yield counter("fenghuo_cluster_replica_heads_behind", "Replicas here an owner's heads "
                      "list found behind (the records of its last messages lost on the way), "
                      "asked for again from their seq.", node.heads_behind)
        yield counter("fenghuo_cluster_heads_missed", "Heads lists from an owner found "
                      "skipped by their number (records lost on the way for longer than a "
                      "channel stays listed): every replica it feeds here asked for again.",
                      node.heads_missed)
        yield counter("fenghuo_cluster_asks_repeated", "Asks of an owner for a replica "
                      "(or their answers) lost on the way: unanswered five heads lists "
                      "later, asked again.", node.asks_repeated)
        yield counter("fenghuo_cluster_ask_records_received", "Records of asks for replicas "
                      "(interest) other nodes sent this node as their channels' owner; each "
                      "lists up to 1,000 channels.", node.ask_records_received)
        lag = node.replica_lag
        yield histogram("fenghuo_cluster_replica_lag_seconds", "From a message's sequencing on "
                        "the node that owns its channel (its ts) to its arrival at this node's "
                        "replica: the JetStream append and the hop (wall clocks: includes the "
                        "hosts' skew).", BOUNDS, [((), lag.counts, lag.sum)])

    def _api(self) -> Iterator[Metric]:
        api = self.relay.api
        if api is None or api.http is None:       # timers only, no HTTP (no --api-port)
            return
        stats = api.stats
        yield labelled_counter("fenghuo_api_requests", "Server API calls with a valid key, by method.",
                               "method", sorted(stats.requests.items()))
        yield counter("fenghuo_api_unauthorized", "Server API calls refused 401 for a wrong or "
                      "missing key.", stats.unauthorized)
        yield labelled_counter("fenghuo_api_errors", "Server API error answers, by protocol error "
                               "code.", "code", sorted(stats.errors.items()))

    def _webhooks(self) -> Iterator[Metric]:
        webhooks = self.relay.webhooks
        if webhooks is None:
            return
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        for name, kind, help_, values in webhooks.metrics():
            family = kinds[kind](name, help_, labels=("endpoint",))
            for endpoint, value in values:
                family.add_metric((endpoint,), value)
            yield family

    def _timers(self) -> Iterator[Metric]:
        api = self.relay.api
        if api is None:
            return
        timers = api.timers
        yield gauge("fenghuo_timers_pending", "Scheduled messages and escalation steps waiting for "
                    "their time (the API's process).", len(timers.pending))
        yield labelled_counter("fenghuo_timers_fired", "Timers fired, by kind.", "kind",
                               sorted(timers.stats.fired.items()))
        yield labelled_counter("fenghuo_timers_failed", "Fired timers whose publish was refused for "
                               "good (logged), by kind.", "kind", sorted(timers.stats.failed.items()))
        yield counter("fenghuo_timers_recovered", "Scheduled messages found already sent when fired "
                      "again after a crash (not resent).", timers.stats.recovered)

    def _store(self) -> Iterator[Metric]:
        store = self.relay.store
        if not isinstance(store, SQLiteStore):
            return
        checkpoints = store.checkpointer
        yield gauge("fenghuo_store_wal_frames", "Pages in the store's WAL after this worker's last "
                    "commit (the checkpointer starts at 65,536).", checkpoints.frames)
        yield counter("fenghuo_store_checkpoints", "Checkpoint passes (WAL pages copied into the "
                      "store's file), by the checkpointer's thread and by the writer's.", checkpoints.passes)
        yield counter("fenghuo_store_wal_restarts", "Times this worker's writer found the WAL copied "
                      "and started it again from its beginning.", checkpoints.restarts)
        yield counter("fenghuo_store_batches", "Batches this worker's writer took (one transaction "
                      "and, under --fsync always|batch, one sync each).", store.batches)
        yield counter("fenghuo_store_batch_records", "Records in those batches (÷ batches: the "
                      "mean batch).", store.batch_records)
        yield counter("fenghuo_store_batches_full", "Batches that reached the writer's limit "
                      f"({MAX_BATCH:,} records): more may have been queued.", store.full_batches)
        for name, help_, h in (
                ("fenghuo_store_batch_wait_seconds", "From the arrival of a batch's oldest publish "
                 "(or held reply) to the writer taking the batch.", store.batch_wait),
                ("fenghuo_store_write_seconds", "A batch's write: its transaction, and under "
                 "--fsync always|batch the sync it ends with.", store.write_time),
                ("fenghuo_store_handback_seconds", "From a batch's commit to the loop having "
                 "released it (under --fsync always its acks and deliveries queued).", store.handback)):
            yield histogram(name, help_, BOUNDS, [((), h.counts, h.sum)])
        writer = store.writer_schedstat()
        yield counter("fenghuo_store_writer_cpu_seconds", "Time the writer's thread ran on a CPU "
                      "(kernel schedstat).", writer.on_cpu)
        yield counter("fenghuo_store_writer_cpu_wait_seconds", "Time the writer's thread was "
                      "runnable and waited for a CPU (kernel schedstat).", writer.cpu_wait)

    def _stalls(self) -> Iterator[Metric]:
        relay = self.relay
        lag = relay.node.loop_lag.histogram
        yield gauge("fenghuo_gc_frozen_objects", "Objects the cyclic collector no longer examines "
                    "(gc.freeze: startup and survivors of full collections).", relay.node.collector.frozen())
        yield gauge("fenghuo_gc_young_threshold_objects", "Allocations of tracked objects between "
                    "two young-generation collections (--gc-young-threshold).",
                    relay.node.collector.young_threshold())
        yield histogram("fenghuo_event_loop_lag_seconds", "How late a timer set 10 ms ahead fired, "
                        "sampled every 10 ms: the loop's stalls.", BOUNDS,
                        [((), lag.counts, lag.sum)])
        own = relay.node.loop_lag.own
        yield histogram("fenghuo_event_loop_own_lag_seconds", "The same lateness less the time the "
                        "loop's thread waited, runnable, for a CPU during that tick (kernel "
                        "schedstat): the relay's own stalls, not a busy machine's.", BOUNDS,
                        [((), own.counts, own.sum)])
        yield gauge("fenghuo_event_loop_slice_seconds", "The time slice the kernel gives the loop's "
                    "thread (--loop-slice-us; 0 where the kernel does not say).", relay.node.loop_slice)
        yield counter("fenghuo_event_loop_cpu_wait_seconds", "Time the loop's thread spent runnable "
                      "but waiting for a CPU (kernel schedstat; 0 where the kernel does not say).",
                      relay.node.loop_lag.cpu_wait)
        yield histogram("fenghuo_gc_pause_seconds", "Garbage collections, by generation, and how "
                        "long each took.", BOUNDS,
                        [((str(g),), h.counts, h.sum) for g, h in enumerate(relay.node.collector.by_generation)],
                        labels=("generation",))


def health(relay: Relay) -> httpd.Response:
    """200 ``ok``; 503 ``draining`` once stopping, or ``degraded`` on a cluster node
    whose engine (NATS) is not connected: it can take no publish of a channel,
    claim, or group change then, so a load balancer should send new clients
    to another node (docs/DESIGN.md, Cluster, Operations)."""
    # A cluster node tells its cluster state: engine, peers, channels owned.
    node = getattr(relay.cluster, "status", None)
    cluster = node() if node is not None else None
    status = ("draining" if relay.node.shutting_down
              else "degraded" if cluster is not None and not cluster["engine_connected"]
              else "ok")
    body = orjson.dumps({"status": status, "epoch": relay.epoch,
                         "connections": len(relay.hub.connections),
                         "uptime": round(time.time() - relay.node.started_at, 3),
                         **({"cluster": cluster} if cluster is not None else {})})
    return httpd.json_response(200 if status == "ok" else 503, body)


async def start(relay: Relay, host: str, port: int) -> asyncio.AbstractServer:
    collector = RelayCollector(relay)

    async def metrics() -> httpd.Response:
        return httpd.metrics_response(collector)

    async def healthz() -> httpd.Response:
        return health(relay)

    return await httpd.start(host, port, {"/metrics": metrics, "/healthz": healthz,
                                          "/health": healthz})
