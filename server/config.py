"""Settings of ``fenghuo serve``: one table, four sources.

Precedence, lowest to highest: built-in default < TOML file (``--config``,
top-level keys or a ``[server]`` table) < environment (``FENGHUO_<NAME>``) <
command-line flag.  The README's configuration table is generated from
:data:`OPTIONS` (``python -m fenghuo.server.config``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


#: ``zero`` of a number that may not be 0: ``fenghuo serve`` refuses it at start-up.
REFUSED = None


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    default: Any
    help: str
    #: for a number: what 0 means, or REFUSED (None); negatives are always refused
    zero: str | None = REFUSED

    @property
    def numeric(self) -> bool:
        return type(self.default) in (int, float)

    @property
    def documentation(self) -> str:
        """The help with the meaning of 0 spelled out, for every number."""
        if not self.numeric:
            return self.help
        return f"{self.help} ({'0: ' + self.zero if self.zero else 'must be above 0'})"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "FENGHUO_" + self.name.upper()


def _opt(default: Any, help: str, zero: str | None = REFUSED) -> Any:
    return field(default=default, metadata={"help": help, "zero": zero})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = _opt(7700, "TCP port of the client protocol", zero="any free port, chosen at start-up")
    ws_port: int = _opt(0, "WebSocket port: the same protocol in binary WebSocket messages",
                        zero="off")
    ws_origins: str = _opt("", "comma-separated Origin values a browser page may connect from "
                               "(empty: any; e.g. 'https://chat.example.com')")
    ws_demo: bool = _opt(False, "serve the browser demo at GET / on the WebSocket port "
                                "(a development aid, not for production)")
    metrics_port: int = _opt(7701, "HTTP port of /metrics and /healthz", zero="no metrics server")
    tls_cert: str = _opt("", "PEM certificate chain: the client port (and the WebSocket port, "
                             "as wss://) speaks only TLS (reloaded on SIGHUP)")
    tls_key: str = _opt("", "PEM private key of --tls-cert (empty: in the certificate file)")
    tls_client_ca: str = _opt("", "PEM CA file: with --tls-cert, require client certificates "
                                  "signed by it (mutual TLS)")
    data_dir: str = _opt("./data", "directory for the message store and the generated dev secret")
    secret: str = _opt("", "HS256 secret that signs tokens; generated and printed when empty "
                           "(visible in `ps`: prefer --secret-file or the environment)")
    secret_file: str = _opt("", "file holding the secret, or several as lines 'KID SECRET' "
                                "(rotation: the first signs, all verify)")
    store: str = _opt("sqlite", "sqlite (durable, in --data-dir) or memory (nothing survives a restart)")
    store_key_file: str = _opt("", "encrypt stored messages with AES-256-GCM: key file, lines "
                                   "'KID KEY' from `fenghuo keygen` (the first encrypts, all "
                                   "decrypt); see Encryption at rest")
    fsync: str = _opt("always", "always: ack after the batch is on disk; batch: ack at once, sync "
                                "per batch; off: ack at once, no sync (see Delivery guarantees)")
    retention: str = _opt("", "how long messages are kept, by channel prefix: e.g. "
                              "'dm:=365d,org.=30d,*=forever' (default: forever); applied to "
                              "the store and the rings, to the rings alone with --store memory")
    retention_interval: float = _opt(3600.0, "seconds between two runs of the retention job")
    mask: str = _opt("", "masking rules, JSON: channel prefix -> detectors (card, cn_id, phone, "
                         "{name, regex}), e.g. '{\"dm:\": [\"card\", \"cn_id\", \"phone\"]}'; "
                         "in TOML a [mask] table (see Masking)")
    max_frame: int = _opt(1 << 20, "largest frame accepted, bytes (header included)")
    ring_size: int = _opt(1024, "messages kept per channel for catch-up after a disconnect")
    max_pending: int = _opt(8 << 20, "unsent bytes per connection before it is cut as a slow consumer")
    compress_threshold: int = _opt(4096, "LZ4-compress MESSAGE bodies of at least this many bytes",
                                   zero="never compress")
    dedupe_span: float = _opt(120.0, "seconds an idempotency key is remembered on its channel "
                                     "after its publish was accepted (see Delivery guarantees)")
    dedupe_window: int = _opt(65536, "idempotency keys held in memory per channel at most; with "
                                     "--store sqlite older keys of the span are kept as a hash and "
                                     "a seq and confirmed on disk")
    rate: float = _opt(20000.0, "frames per second a connection may send (token bucket refill)")
    burst: float = _opt(40000.0, "frames a connection may send at once (token bucket size)")
    handshake_timeout: float = _opt(10.0, "seconds a new connection has to send HELLO")
    ping_interval: float = _opt(25.0, "seconds of silence before the server sends PING")
    idle_timeout: float = _opt(75.0, "seconds of silence before the server closes the connection")
    token_grace: float = _opt(30.0, "seconds a connection may outlive its token's exp without "
                                    "a REFRESH before it is closed with TOKEN_EXPIRED",
                              zero="closed at exp")
    revocation_interval: float = _opt(1.0, "seconds between two reads of new token revocations "
                                           "from the store")
    drain_timeout: float = _opt(5.0, "seconds graceful shutdown waits for clients to leave",
                                zero="do not wait")
    backlog: int = _opt(4096, "listen backlog (the kernel caps it at net.core.somaxconn)")
    loop_slice_us: int = _opt(100, "time slice in microseconds the event loop's thread asks of the "
                                   "kernel (Linux 6.12 and later): on a busy CPU a woken loop with "
                                   "a slice shorter than the running task's takes the CPU at once "
                                   "(see The latency tail)", zero="the kernel's default")
    gc_young_threshold: int = _opt(700, "allocations (less deallocations) of tracked objects "
                                        "between two collections of the cyclic collector's young "
                                        "generation (gc.set_threshold's first; CPython's 700; see "
                                        "The cyclic collector)")
    max_connections: int = _opt(0, "open client connections per worker; beyond it a new one is "
                                   "refused with TRY_AGAIN", zero="the open-file limit less 256")
    max_handshakes: int = _opt(2048, "connections per worker accepted and not yet past HELLO; beyond "
                                     "it a new one is refused with TRY_AGAIN at once", zero="no limit")
    admit_rate: float = _opt(0.0, "HELLOs a worker admits per second (token bucket refill); a "
                                  "HELLO above it is refused with TRY_AGAIN", zero="no limit")
    admit_burst: float = _opt(1000.0, "HELLOs a worker admits at once (token bucket size)")
    workers: int = _opt(0, "worker processes sharing the port (SO_REUSEPORT) and the store "
                           "(1: a single process, no supervisor)",
                           zero="one per core")
    request_timeout: float = _opt(5.0, "seconds a request another worker answers (a publish, GROUP "
                                       "change or RECEIPT forwarded to its channel's owner) may wait; "
                                       "then it is answered REQUEST_TIMEOUT")
    replica_idle: float = _opt(60.0, "seconds a worker keeps receiving a channel another worker "
                                     "owns after the last of its sessions needing it left",
                               zero="let go at once")
    cluster: str = _opt("", "comma-separated NATS URLs (nats://h1:4222,nats://h2:4222) of a NATS "
                            "cluster with JetStream: this relay becomes one node of a "
                            "cluster of relays (docs/DESIGN.md, Cluster; empty: a single node)")
    node: str = _opt("", "this node's name in the cluster: letters, digits, '-' and '_', unique "
                         "per cluster (empty: the host name)")
    region: str = _opt("default", "this node's region: letters, digits, '-' and '_'")
    stream_tags: str = _opt("", "comma-separated tags (nats-server server_tags) a server must "
                                "carry, every one, to hold a replica of the cluster's stream and "
                                "buckets; applied when they are made (docs/DESIGN.md, Placing the "
                                "stream; empty: any servers)")
    stream_leader: str = _opt("", "the nats-server (its server_name) that should lead the cluster's "
                                  "stream and buckets: one node moves their leaders there while "
                                  "it holds a current replica (empty: wherever JetStream elects)")
    cluster_lease: float = _opt(3.0, "seconds without a heartbeat after which a node is dead "
                                     "and its channels are taken over by others")
    api_port: int = _opt(0, "HTTP port of the server API for backends, docs/API.md (served by "
                            "worker 0 under several workers)", zero="no server API")
    api_host: str = _opt("127.0.0.1", "address the server API listens on")
    api_key_file: str = _opt("", "file of the server API's keys: one key, or sha256:<hex> of one, "
                                 "a line (required with --api-port)")
    api_timeout: float = _opt(10.0, "seconds an API call may take before it is answered 504")
    api_max_body: int = _opt(4 << 20, "largest API request body, bytes (413 beyond)")
    webhooks: str = _opt("", "TOML file of webhook endpoints ([[endpoint]] name, url, secrets, "
                             "events, channels; docs/API.md, Webhooks; urls, secrets and filters "
                             "reloaded on SIGHUP); needs --store sqlite")
    webhook_timeout: float = _opt(10.0, "seconds a webhook request may take, connecting and "
                                        "reading the answer included; then it is retried")
    webhook_concurrency: int = _opt(8, "webhook requests in flight per endpoint at most (one per "
                                       "channel: a channel's events go in order)")
    webhook_retry_max: float = _opt(600.0, "longest wait between two attempts at a webhook event "
                                           "(waits start at 1 s and double, with jitter)")
    webhook_max_age: float = _opt(259200.0, "seconds a webhook event is retried; then it is a "
                                            "dead letter, kept and replayable through the API")
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: str = _opt("json", "json (one object per line) or text")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def __post_init__(self) -> None:
        for name, allowed in (("store", ("sqlite", "memory")), ("fsync", ("always", "batch", "off")),
                              ("log_format", ("json", "text"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.numeric and (value < 0 or (value == 0 and option.zero is REFUSED)):
                raise ValueError(f"{option.flag} must be {'>= 0' if option.zero else 'above 0'}"
                                 f", not {value:g}")
        if self.dedupe_window > 1 << 30:        # DEDUPE_MAX_KEYS (core/dedupe.pxd)
            raise ValueError(f"--dedupe-window must be at most {1 << 30}, not {self.dedupe_window}")
        if (self.tls_key or self.tls_client_ca) and not self.tls_cert:
            raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
        if self.admit_rate and self.admit_burst < 1:
            raise ValueError("--admit-burst must be >= 1 when --admit-rate is set")
        if self.api_port and not self.api_key_file:
            raise ValueError("--api-port needs --api-key-file: the server API takes no request without a key")
        if self.webhooks and self.store != "sqlite":
            raise ValueError("--webhooks needs --store sqlite: the outbox is a table of the store")
        self._check_cluster()
        from fenghuo.server.retention import parse_rules
        parse_rules(self.retention)
        from fenghuo.server.masking import parse_rules as parse_mask
        parse_mask(self.mask)
        if self.store_key_file and self.store != "sqlite":
            raise ValueError("--store-key-file encrypts the sqlite store: it needs --store sqlite")
        if self.store_key_file:
            from fenghuo.server.keyfile import load as load_keys
            load_keys(self.store_key_file)      # a bad key file stops the start, not the first write


    def _check_cluster(self) -> None:
        for name in ("node", "region"):
            value = getattr(self, name)
            if value and not NAME.fullmatch(value):
                raise ValueError(f"--{name} may hold only letters, digits, '-' and '_', not {value!r}")
        if not self.cluster:
            return
        for url in self.cluster_urls:
            if not URL.fullmatch(url):
                raise ValueError(f"--cluster takes nats://host:port URLs separated by commas, "
                                 f"not {url!r}")
        if importlib.util.find_spec("nats") is None:
            raise ValueError("--cluster needs the nats-py package: pip install 'fenghuo[cluster]'")
        if self.store != "sqlite":
            raise ValueError("--cluster needs --store sqlite: groups and cursors are kept "
                             "there, messages in JetStream")
        if self.webhooks:
            raise ValueError("--webhooks is not built for --cluster yet")
        if self.fsync != "always":
            raise ValueError("--cluster acks a publish once JetStream holds it: "
                             "--fsync must be always")

    @property
    def cluster_urls(self) -> list[str]:
        return [u.strip() for u in self.cluster.split(",") if u.strip()]

    @property
    def stream_tag_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.stream_tags.split(",") if t.strip())

    @property
    def node_name(self) -> str:
        """``--node``, or the host name made fit for a NATS subject."""
        return self.node or re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())


NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
URL = re.compile(r"(nats|tls)://[^,\s/]+:\d+")


OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.default, f.metadata["help"], f.metadata["zero"]) for f in fields(Settings)
)


def _coerce(option: Option, value: Any, source: str) -> Any:
    kind = type(option.default)
    if (kind in (int, float) and isinstance(value, bool)) or (kind is int and isinstance(value, float)):
        raise ValueError(f"{source}: {option.name} must be {kind.__name__}, got {value!r}")
    try:
        if kind is bool:
            return str(value).lower() in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {option.name} must be {kind.__name__}, got {value!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; absent flags stay None so lower sources show through."""
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file")
    for option in OPTIONS:
        if isinstance(option.default, bool):
            parser.add_argument(option.flag, dest=option.name, default=None, action="store_true",
                                help=f"{option.documentation} [{option.env}]")
            continue
        parser.add_argument(option.flag, dest=option.name, default=None,
                            type=type(option.default), help=f"{option.documentation} [{option.env}]")


def load(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: str | None = None) -> Settings:
    """Settings from defaults, then ``config_file``, then ``env``, then ``args``."""
    args = dict(args or {})
    env = os.environ if env is None else env
    config_file = config_file or args.pop("config", None) or env.get("FENGHUO_CONFIG")
    values: dict[str, Any] = {}
    known = {o.name: o for o in OPTIONS}
    if config_file:
        with open(config_file, "rb") as f:
            table = tomllib.load(f)
        server = table.pop("server", {})
        if not isinstance(server, dict):
            raise ValueError(f"{config_file}: [server] must be a table")
        for key, value in [*table.items(), *server.items()]:
            option = known.get(key.replace("-", "_"))
            if option is None:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            if option.name == "mask":          # a table of rules: the JSON --mask takes
                from fenghuo.server.masking import from_toml
                value = from_toml(value)
            values[option.name] = _coerce(option, value, config_file)
    for option in OPTIONS:
        if option.env in env:
            values[option.name] = _coerce(option, env[option.env], option.env)
        if args.get(option.name) is not None:
            values[option.name] = _coerce(option, args[option.name], option.flag)
    return Settings(**values)


def markdown_table() -> str:
    """The configuration table of the README."""
    rows = ["| flag | environment | TOML key | default | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        rows.append(f"| `{o.flag}` | `{o.env}` | `{o.name}` | `{o.default!r}` | {o.documentation} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
