"""A local NATS cluster with JetStream on loopback: the engine under a fenghuo cluster.

Used by the tests' fixtures and by ``make cluster``::

    python scripts/nats_cluster.py                 # 3 nats-servers, Ctrl-C stops them
    python scripts/nats_cluster.py --nodes 3       # ... and 3 fenghuo nodes on them
                                                   # (clients: 7400-7402, metrics: 7410-7412)
    python scripts/nats_cluster.py --nodes 3 --regions east,west,south --stream-leader n0
                                                   # servers tagged region:<r>, node k in
                                                   # region k, the stream led from n0

Every server gets free loopback ports (client, cluster route, monitoring)
and a JetStream store directory under one temporary folder, removed at
stop.  A stop is SIGTERM (nats-server flushes its store), then SIGKILL after
a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.targets import free_ports, peer_binary  # noqa: E402
from fenghuo.server.supervisor import die_with  # noqa: E402

CLUSTER_NAME = "fenghuo"
# Starting three servers and electing JetStream's meta leader takes about a
# second on the 2-core development machine; 30 s leaves room for a busy one.
READY_TIMEOUT = 30.0
# Tries at starting the servers when one could not bind a port it was given
# (taken between the pick and nats-server's bind).
START_ATTEMPTS = 3
STOP_GRACE = 5.0
# The local cluster's token secret unless FENGHUO_SECRET says otherwise (32
# bytes: HS256 wants no shorter); `fenghuo chat` needs the same one.
DEV_SECRET = "local-cluster-dev-secret-32bytes"


class PortTaken(RuntimeError):
    """A nats-server exited because a port it was given was taken meanwhile."""


@dataclass
class NatsServer:
    """One nats-server of the cluster."""

    name: str
    host: str
    port: int            # clients
    route_port: int      # the other servers of the cluster
    http_port: int       # monitoring: /healthz, /jsz
    store_dir: Path
    log_path: Path
    #: the largest message a client may publish (nats-server's default, 1 MiB, if None)
    max_payload: int | None = None
    #: ``server_tags``: what ``--stream-tags`` selects servers by (``region:<name>``, ...)
    tags: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config(self, routes: list[str]) -> str:
        limits = {} if self.max_payload is None else {"max_payload": self.max_payload}
        tags = {"server_tags": list(self.tags)} if self.tags else {}
        return json.dumps({
            "server_name": self.name, "host": self.host, "port": self.port,
            "http_port": self.http_port, **limits, **tags,
            "jetstream": {"store_dir": str(self.store_dir),
                          "max_memory_store": 64 << 20, "max_file_store": 1 << 30},
            "cluster": {"name": CLUSTER_NAME, "host": self.host, "port": self.route_port,
                        "routes": routes},
        }, indent=2)

    def start(self, binary: str, routes: list[str], cpu: int | None = None) -> None:
        """Start it; with ``cpu``, pinned there (every thread: set before exec).

        It gets SIGTERM when the thread that started it ends, the process
        killed by SIGKILL included (``die_with``): a test run or bench killed
        before its cleanup left its servers running, with their ports and
        stores, for as long as the machine ran. It is in a session of its
        own (no Ctrl-C of the caller's terminal reaches it: the caller stops
        it, store flushed), so this is what ends it otherwise.
        """
        conf = self.store_dir.parent / f"{self.name}.conf"
        conf.write_text(self.config(routes))
        dies = die_with(os.getpid())

        def preexec() -> None:
            dies()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        with open(self.log_path, "ab") as log:
            # preexec_fn is safe: servers are started before the caller has threads.
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log,  # noqa: PLW1509
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=preexec)

    def healthy(self) -> bool:
        """JetStream is up here and this server knows the meta leader (``/healthz``)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/healthz",
                                        timeout=1) as r:
                return r.status == 200 and json.load(r).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def meta_cluster(self) -> dict:
        """What this server knows of the JetStream meta group (``/jsz``'s
        ``meta_cluster``: leader, cluster_size, ...); empty for no answer."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/jsz",
                                        timeout=1) as r:
                return json.load(r).get("meta_cluster") or {}
        except (OSError, ValueError):
            return {}

    def meta_leader(self) -> str:
        """The JetStream meta leader this server names, "" for none or no answer."""
        return str(self.meta_cluster().get("leader") or "")

    def kill(self) -> None:
        """``kill -9``: what a crash looks like to the others."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class NatsCluster:
    """``size`` nats-servers with JetStream, routed to each other, under ``base``."""

    base: Path
    size: int = 3
    host: str = "127.0.0.1"
    servers: list[NatsServer] = field(default_factory=list)
    _own_base: bool = False

    @classmethod
    def start(cls, base: Path | None = None, size: int = 3, host: str = "127.0.0.1",
              timeout: float = READY_TIMEOUT, cpu: int | None = None,
              max_payload: int | None = None,
              tags: list[tuple[str, ...]] | None = None) -> NatsCluster:
        """Start ``size`` servers and wait for JetStream; ``cpu`` pins them (the benches);
        ``max_payload`` caps a message's size (nats-server's default: 1 MiB);
        ``tags``: each server's ``server_tags``, in order."""
        binary = peer_binary("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed: run bash bench/peers/install.sh")
        own = base is None
        cluster = cls(Path(tempfile.mkdtemp(prefix="fenghuo-nats-")) if base is None else base,
                      size, host, _own_base=own)
        cluster.base.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            cluster.servers = []
            # One block below the ephemeral range (free_ports): a port picked
            # in it could be taken by any outgoing connection before
            # nats-server binds it (CI, f676643: "Error listening on router
            # port ... address already in use"), and the servers keep their
            # ports across restart(), when that risk would last longer.
            first = free_ports(3 * size, host)
            for i in range(size):
                store = cluster.base / f"n{i}"
                store.mkdir(exist_ok=True)
                client = first + 3 * i
                cluster.servers.append(NatsServer(
                    f"n{i}", host, client, client + 1, client + 2, store,
                    cluster.base / f"n{i}.log", max_payload,
                    tags[i] if tags is not None else ()))
            try:
                for server in cluster.servers:
                    server.start(binary, cluster.routes, cpu)
                cluster.wait_ready(timeout)
                return cluster
            except PortTaken:
                cluster.stop(keep_base=True)
                for server in cluster.servers:        # a fresh JetStream on the next ports
                    shutil.rmtree(server.store_dir, ignore_errors=True)
                if attempt == START_ATTEMPTS:
                    cluster.stop()
                    raise
            except BaseException:
                cluster.stop()
                raise
        raise AssertionError("unreachable")

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def routes(self) -> list[str]:
        """Where the servers reach each other (each is given all of them)."""
        return [f"nats://{self.host}:{s.route_port}" for s in self.servers]

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Start again every server that is not running (killed or stopped), on its
        ports and with its store, and wait for JetStream."""
        binary = peer_binary("nats-server")
        assert binary is not None
        for server in self.servers:
            if server.proc is None or server.proc.poll() is not None:
                server.start(binary, self.routes)
        self.wait_ready(timeout)

    @property
    def url_list(self) -> str:
        """The form ``--cluster`` takes: ``nats://h:p,nats://h:p,...``."""
        return ",".join(self.urls)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every server started is healthy; PortTaken (RuntimeError for another
        cause) when one exited. A server that exited before this call counts too:
        one that could not bind its port exits within milliseconds, and left out it
        was neither waited for nor reported (a cluster of fewer servers, no retry)."""
        deadline = time.monotonic() + timeout
        running = [s for s in self.servers if s.proc is not None]
        while not all(s.healthy() for s in running):
            for s in running:
                if s.proc is not None and s.proc.poll() is not None:
                    log = s.log_path.read_text(errors="replace")
                    error = PortTaken if "address already in use" in log else RuntimeError
                    raise error(f"nats-server {s.name} exited:\n{log}")
            if time.monotonic() > deadline:
                logs = "\n".join(s.log_path.read_text(errors="replace") for s in running)
                raise RuntimeError(f"NATS cluster not ready within {timeout:g} s:\n{logs}")
            time.sleep(0.1)

    def stop(self, keep_base: bool = False) -> None:
        """Stop every server; remove the folder if it was made here (not with ``keep_base``)."""
        for server in self.servers:
            server.stop()
        if self._own_base and not keep_base:
            shutil.rmtree(self.base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3, help="nats-servers (default 3)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="fenghuo nodes to start on the cluster (default 0)")
    parser.add_argument("--port", type=int, default=7400,
                        help="the first fenghuo node's client port; node k listens on port + k")
    parser.add_argument("--secret", default=os.environ.get("FENGHUO_SECRET", DEV_SECRET),
                        help=f"the nodes' token secret (default: $FENGHUO_SECRET or {DEV_SECRET})")
    parser.add_argument("--regions", default="",
                        help="comma-separated, one per server: server k is tagged region:<its "
                             "region> (server_tags) and node k runs with --region <it>")
    parser.add_argument("--stream-leader", default="",
                        help="the nodes' --stream-leader: the server (n0, n1, ...) that should "
                             "lead the stream and buckets")
    args = parser.parse_args(argv)
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if regions and len(regions) != args.servers:
        parser.error(f"--regions names {len(regions)} regions for {args.servers} servers")
    cluster = NatsCluster.start(size=args.servers,
                                tags=[(f"region:{r}",) for r in regions] if regions else None)
    nodes: list[subprocess.Popen] = []
    try:
        print(f"NATS cluster: {cluster.url_list} (stores under {cluster.base})", flush=True)
        # The servers' ports are picked free each run, so the README's status
        # command cannot name them: a user copies this line instead.
        print(f"cluster status: {_fenghuo_command()} cluster status --cluster "
              f"{cluster.url_list} --channels", flush=True)
        for k in range(args.nodes):
            port = args.port + k
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "fenghuo", "serve", "--workers", "1", "--port", str(port),
                 "--metrics-port", str(port + 10), "--data-dir", str(cluster.base / f"node{k}"),
                 "--cluster", cluster.url_list, "--node", f"node{k}",
                 f"--secret={args.secret}",
                 *(["--region", regions[k % len(regions)]] if regions else []),
                 *(["--stream-leader", args.stream_leader] if args.stream_leader else [])],
                # SIGTERM to the node should this script die without stopping it.
                preexec_fn=die_with(os.getpid())))  # noqa: PLW1509
            print(f"fenghuo node{k}: tcp://127.0.0.1:{port} (metrics, /healthz: :{port + 10})",
                  flush=True)
        print("Ctrl-C stops everything", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
        cluster.stop()
    return 0


def _fenghuo_command() -> str:
    """The ``fenghuo`` command beside this interpreter, as a user would type it here."""
    script = Path(sys.executable).parent / "fenghuo"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # SIGTERM and SIGINT alike stop the nodes, then the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main())
