"""``/metrics`` (Prometheus text format 0.0.4) and ``/healthz`` over plain HTTP/1.1."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import orjson

from fenghuo.server.stalls import BOUNDS, Histogram

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay

log = logging.getLogger("fenghuo.metrics")

_COUNTERS = (
    ("frames_in", "fenghuo_frames_received_total", "Frames received from clients."),
    ("bytes_in", "fenghuo_bytes_received_total", "Bytes received from clients."),
    ("frames_out", "fenghuo_frames_sent_total", "Frames written to clients."),
    ("bytes_out", "fenghuo_bytes_sent_total", "Bytes written to clients."),
    ("writes", "fenghuo_writes_total", "Coalesced writes (at most one per connection per loop iteration)."),
    ("publishes", "fenghuo_messages_published_total", "Messages sequenced."),
    ("duplicates", "fenghuo_publish_duplicates_total", "Publishes answered from the idempotency window."),
    ("key_lookups", "fenghuo_publish_key_lookups_total",
     "Idempotency keys asked of the store: ones a full window may have given up before their span was over."),
    ("deliveries", "fenghuo_deliveries_total", "Message frames queued to subscribers, live or caught up."),
    ("slow_consumers", "fenghuo_slow_consumer_disconnects_total", "Connections cut for exceeding max_pending."),
    ("rate_limited", "fenghuo_rate_limited_disconnects_total", "Connections cut for exceeding the frame rate."),
)


def render(relay: Relay) -> str:
    snap = relay.hub.metrics.snapshot()
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    family("fenghuo_connections", "gauge", "Open client connections.")
    out.append(f"fenghuo_connections {len(relay.hub.connections)}")
    family("fenghuo_handshakes", "gauge", "Connections accepted and not yet past HELLO.")
    out.append(f"fenghuo_handshakes {relay.admission.handshaking}")
    family("fenghuo_users_online", "gauge", "Users with at least one authenticated connection.")
    out.append(f"fenghuo_users_online {len(relay.users)}")
    family("fenghuo_channels", "gauge", "Channels held in memory.")
    out.append(f"fenghuo_channels {len(relay.hub.channels)}")
    if relay.cluster is not None:
        cluster = relay.cluster
        family("fenghuo_remote_origins", "gauge",
               "Other workers' connections this worker has answered for (as a channel owner).")
        out.append(f"fenghuo_remote_origins {len(cluster.remote)}")
        family("fenghuo_forwarded_waiting", "gauge",
               "Local connections with requests forwarded to other workers and unanswered.")
        out.append(f"fenghuo_forwarded_waiting {len(cluster.forwarded)}")
        family("fenghuo_replica_channels", "gauge",
               "Channels other workers own that this worker receives (its sessions asked).")
        out.append(f"fenghuo_replica_channels {len(cluster.ready_here)}")
        family("fenghuo_replica_messages_total", "counter",
               "Messages other workers sequenced and sent here for this worker's sessions.")
        out.append(f"fenghuo_replica_messages_total {cluster.replica_messages}")
    if relay.api is not None:
        stats = relay.api.stats
        family("fenghuo_api_requests_total", "counter", "Server API calls with a valid key, by method.")
        for method, count in sorted(stats.requests.items()):
            out.append(f'fenghuo_api_requests_total{{method="{method}"}} {count}')
        family("fenghuo_api_unauthorized_total", "counter",
               "Server API calls refused 401 for a wrong or missing key.")
        out.append(f"fenghuo_api_unauthorized_total {stats.unauthorized}")
        family("fenghuo_api_errors_total", "counter", "Server API error answers, by protocol error code.")
        for code, count in sorted(stats.errors.items()):
            out.append(f'fenghuo_api_errors_total{{code="{code}"}} {count}')
    if relay.webhooks is not None:
        for name, kind, help_, values in relay.webhooks.metrics():
            family(name, kind, help_)
            out.extend(f'{name}{{endpoint="{endpoint}"}} {value}' for endpoint, value in values)
    progress = relay.progress
    family("fenghuo_status_delivered_total", "counter", "Messages that reached a device of a user, "
           "summed over users: delivery cursors moved by CURSOR sync and receipts (5 to 9 counts 4).")
    out.append(f"fenghuo_status_delivered_total {progress.delivered}")
    family("fenghuo_status_read_total", "counter",
           "Messages read, summed over users: read cursors moved by READ receipts.")
    out.append(f"fenghuo_status_read_total {progress.read}")
    family("fenghuo_status_escalated_total", "counter",
           "Escalations fired: one per recipient per step of a delivery policy.")
    out.append(f"fenghuo_status_escalated_total {progress.escalated}")
    family("fenghuo_status_clicked_total", "counter",
           "First clicks: a user following a link of a message for the first time (CLICKED receipts).")
    out.append(f"fenghuo_status_clicked_total {progress.clicked}")
    family("fenghuo_status_clicks_total", "counter", "CLICKED receipts accepted, repeats included.")
    out.append(f"fenghuo_status_clicks_total {progress.clicks}")
    out += relay.masking.metrics()
    if relay.api is not None:
        timers = relay.api.timers
        family("fenghuo_timers_pending", "gauge",
               "Scheduled messages and escalation steps waiting for their time (the API's process).")
        out.append(f"fenghuo_timers_pending {len(timers.pending)}")
        family("fenghuo_timers_fired_total", "counter", "Timers fired, by kind.")
        for kind, count in sorted(timers.stats.fired.items()):
            out.append(f'fenghuo_timers_fired_total{{kind="{kind}"}} {count}')
        family("fenghuo_timers_failed_total", "counter",
               "Fired timers whose publish was refused for good (logged), by kind.")
        for kind, count in sorted(timers.stats.failed.items()):
            out.append(f'fenghuo_timers_failed_total{{kind="{kind}"}} {count}')
        family("fenghuo_timers_recovered_total", "counter",
               "Scheduled messages found already sent when fired again after a crash (not resent).")
        out.append(f"fenghuo_timers_recovered_total {timers.stats.recovered}")
    family("fenghuo_uptime_seconds", "gauge", "Seconds since the relay started.")
    out.append(f"fenghuo_uptime_seconds {time.time() - relay.started_at:.3f}")
    for key, name, help_ in _COUNTERS:
        family(name, "counter", help_)
        out.append(f"{name} {snap[key]}")
    family("fenghuo_errors_total", "counter", "ERROR frames sent, by protocol error code.")
    for code, count in sorted(snap["errors"].items()):
        out.append(f'fenghuo_errors_total{{code="{code}"}} {count}')
    name = "fenghuo_publish_to_deliver_seconds"
    family(name, "histogram",
           "From a PUBLISH read off the socket to its frames handed to the kernel.")
    cumulative = 0
    # The last count is the +Inf bucket, written below from the total.
    for bound, count in zip(snap["latency_bounds"], snap["latency_counts"][:-1], strict=True):
        cumulative += count
        out.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
    out.append(f'{name}_bucket{{le="+Inf"}} {snap["latency_count"]}')
    out.append(f"{name}_sum {snap['latency_sum']:.9f}")
    out.append(f"{name}_count {snap['latency_count']}")
    family("fenghuo_gc_frozen_objects", "gauge",
           "Objects the cyclic collector no longer examines (gc.freeze: startup and survivors of full collections).")
    out.append(f"fenghuo_gc_frozen_objects {relay.collector.frozen()}")
    _histogram(out, "fenghuo_event_loop_lag_seconds",
               "How late a timer set 10 ms ahead fired, sampled every 10 ms: the loop's stalls.",
               [("", relay.loop_lag.histogram)])
    _histogram(out, "fenghuo_gc_pause_seconds", "Garbage collections, by generation, and how long each took.",
               [(f'generation="{g}"', h) for g, h in enumerate(relay.collector.by_generation)])
    return "\n".join(out) + "\n"


def _histogram(out: list[str], name: str, help_: str, series: list[tuple[str, Histogram]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} histogram")
    for labels, h in series:
        sep = "," if labels else ""
        cumulative = 0
        for bound, count in zip((*BOUNDS, "+Inf"), h.counts, strict=True):
            cumulative += count
            le = bound if isinstance(bound, str) else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cumulative}')
        braces = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{braces} {h.sum:.9f}")
        out.append(f"{name}_count{braces} {cumulative}")


def health(relay: Relay) -> tuple[int, bytes]:
    status = "draining" if relay.shutting_down else "ok"
    # A cluster node tells its cluster state: engine, peers, channels owned.
    node = getattr(relay.cluster, "status", None)
    body = orjson.dumps({"status": status, "epoch": relay.epoch,
                         "connections": len(relay.hub.connections),
                         "uptime": round(time.time() - relay.started_at, 3),
                         **({"cluster": node()} if node is not None else {})})
    return (503 if relay.shutting_down else 200), body


async def _handle(relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        path = request.split(b" ", 2)[1].split(b"?", 1)[0] if request.count(b" ") >= 2 else b""
        if path == b"/metrics":
            status, ctype, body = 200, "text/plain; version=0.0.4", render(relay).encode()
        elif path in (b"/healthz", b"/health"):
            status, body = health(relay)
            ctype = "application/json"
        else:
            status, ctype, body = 404, "text/plain", b"not found\n"
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def start(relay: Relay, host: str, port: int) -> asyncio.AbstractServer:
    server = await asyncio.start_server(lambda r, w: _handle(relay, r, w), host, port,
                                        reuse_address=True)
    log.info("metrics listening", extra={"host": host, "port": server.sockets[0].getsockname()[1]})
    return server
