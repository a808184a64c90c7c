"""Several workers on one node: start them, wire the mesh, restart the dead, stop them all.

:class:`Supervisor` makes one :class:`~fenghuo.core.ShmRing` per ordered pair
of workers and starts worker ``k`` as ``worker_cmd + argv + worker_args(k)``
with ``FENGHUO_WORKER``/``FENGHUO_MESH`` in its environment and exactly its
rings' descriptors passed (``server/mesh.py`` reads them).  It holds every
descriptor for the whole run, so a ring's contents survive the death of
either worker on it, and a restarted worker (``generation`` + 1) attaches the
same rings.

One small event loop does everything: each child's exit arrives through a
pidfd registered with ``add_reader`` (no SIGCHLD handler, no watcher thread),
signals through ``add_signal_handler``, restarts through ``call_later``, and
``/healthz`` and ``/metrics`` are served by ``server/httpd.py``.

Metrics convention: with ``metrics_port`` P the supervisor serves P, and
worker ``k`` is told (``FENGHUO_METRICS_PORT``) to serve its own on
``P + 1 + k``; the supervisor's ``/metrics`` merges them (prometheus-client's
parser), each sample labelled ``worker="k"``, with its own gauges.  With P = 0 the workers serve none.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from fenghuo.core import ShmRing
from fenghuo.server import httpd, metrics
from fenghuo.server.mesh import new_boot_id, worker_env

log = logging.getLogger("fenghuo.supervisor")

DEFAULT_RING_CAPACITY = 4 << 20       # max_record 2 MiB: a 1 MiB frame with room for routing
DEFAULT_DRAIN_TIMEOUT = 15.0
# -P: ``-m`` would otherwise put the working folder first on sys.path, and
# run from a source checkout its ``fenghuo/`` folder (without the compiled
# core) would shadow the installed package in every worker.
DEFAULT_WORKER_CMD = (sys.executable, "-P", "-m", "fenghuo", "serve")
KILL_WAIT = 5.0                       # after SIGKILL, for the kernel to reap
# A worker's exit status for "a restart cannot help" (its store failed: the
# disk is full or the file broken, for every worker alike): the supervisor
# then stops the relay, as one process would stop.  EX_IOERR of sysexits.h.
EXIT_STOP_RELAY = 74
# The supervisor's status when a worker kept dying at start-up (see Backoff).
EXIT_WORKERS_FAIL_TO_START = 3

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl     # looked up here, not in the child


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a worker: ``initial`` doubling to ``maximum``.

    A worker that stayed up ``reset_after`` seconds starts again from
    ``initial``: it crashed once, not in a loop.

    A worker that exits less than ``startup`` seconds after it was started
    failed to start; ``give_up_after`` such failures in a row of one worker
    (a missing module, a bad setting, a port another program holds: what a
    restart cannot mend) stop the relay with
    :data:`EXIT_WORKERS_FAIL_TO_START` rather than restart it forever.
    """

    initial: float = 0.1
    maximum: float = 5.0
    reset_after: float = 30.0
    startup: float = 10.0
    give_up_after: int = 5


@dataclass(eq=False)
class _Worker:
    index: int
    generation: int = -1
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    started_at: float = 0.0
    returncode: int | None = None
    status: int = 0                 # what the supervisor's own exit reports for it
    restarts: int = 0
    failed_starts: int = 0          # exits within Backoff.startup, in a row
    next_delay: float = 0.0
    restart: asyncio.TimerHandle | None = None
    exited: asyncio.Future[int] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None


@dataclass(eq=False)
class Supervisor:
    """Starts and keeps ``workers`` worker processes sharing a mesh of rings.

    ``worker_args(k)`` adds per-worker arguments (a distinct port in tests,
    say); ``worker_cmd`` replaces ``fenghuo serve`` (tests run a small mesh
    program).  Workers' stdout and stderr are the supervisor's.

    ``restart_together``: a worker's death restarts every worker, on new
    rings and with a new boot id (``FENGHUO_BOOT``, the epoch's).  For
    ``--store memory``, where the relay's state is the workers' memories
    together, and ``--fsync batch|off``, where a worker killed loses what
    it acked and had not written: a successor that alone started again
    would give those seqs to new messages, and the others' replicas and
    clients would take them for second copies (PROTOCOL §6.6).
    """

    ring_capacity: int = DEFAULT_RING_CAPACITY
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    worker_cmd: Sequence[str] = DEFAULT_WORKER_CMD
    worker_args: Callable[[int], list[str]] = lambda index: []
    backoff: Backoff = field(default_factory=Backoff)
    restart_together: bool = False

    def run(self, argv_for_workers: list[str], workers: int,
            env: Mapping[str, str] | None = None) -> int:
        """Run until SIGTERM or SIGINT; 0 if every worker's last exit was 0, else 1.

        A second SIGTERM/SIGINT while stopping kills the workers at once.
        """
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        return uvloop.run(_Run(self, list(argv_for_workers), workers,
                               dict(os.environ if env is None else env)).main())

    def worker_metrics_port(self, index: int) -> int:
        """Where worker ``index`` serves its own /metrics: ``metrics_port + 1 + index`` (0: none)."""
        return self.metrics_port + 1 + index if self.metrics_port else 0


class _Run:
    """One run of a :class:`Supervisor`: its rings, its workers, its loop."""

    def __init__(self, config: Supervisor, argv: list[str], count: int,
                 env: dict[str, str]) -> None:
        self.config = config
        self.argv = argv
        self.env = env
        self.workers = [_Worker(k, next_delay=config.backoff.initial) for k in range(count)]
        self.rings = _mesh_rings(count, config.ring_capacity)
        self.stopping = False
        self.gave_up = False
        # Stopping the living to start them all again (Supervisor.restart_together).
        self.together: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop     # the running loop, from main()
        self.stop_requested: asyncio.Event       # made in main(), on that loop
        self.started_at = 0.0

    async def main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.started_at = self.loop.time()
        self.stop_requested = stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, stop_requested)
        # Certificate reload: every worker reads its files again.
        self.loop.add_signal_handler(signal.SIGHUP, self._signal_running, signal.SIGHUP)
        http = None
        try:
            if self.config.metrics_port:
                http = await httpd.start(self.config.metrics_host, self.config.metrics_port, {
                    "/metrics": self._metrics, "/healthz": self._healthz, "/health": self._healthz})
            log.info("supervisor started", extra={
                "workers": len(self.workers), "ring_capacity": self.config.ring_capacity,
                "rings": len(self.rings), "metrics_port": self.config.metrics_port})
            for worker in self.workers:
                self._spawn(worker)
            await stop_requested.wait()
            await self._stop_all()
        finally:
            if http is not None:
                http.close()
            for ring in self.rings.values():
                ring.close()
        if self.gave_up:
            return EXIT_WORKERS_FAIL_TO_START
        return 0 if all(w.status == 0 for w in self.workers) else 1

    def _on_signal(self, stop_requested: asyncio.Event) -> None:
        if self.stopping:                 # asked twice: do not wait for the drain
            log.warning("second stop signal: killing the workers")
            self._signal_running(signal.SIGKILL)
        stop_requested.set()

    # ------------------------------------------------------------ workers

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        worker.generation += 1
        mesh_env, fds = worker_env(worker.index, len(self.workers), worker.generation, self.rings)
        env = {**self.env, **mesh_env,
               "FENGHUO_METRICS_PORT": str(self.config.worker_metrics_port(worker.index))}
        argv = [*self.config.worker_cmd, *self.argv, *self.config.worker_args(worker.index)]
        try:
            # The loop's only other threads are libuv's idle resolver pool.
            proc = subprocess.Popen(argv, env=env, pass_fds=fds,
                                    preexec_fn=die_with(os.getpid()))  # noqa: PLW1509
        except OSError as exc:
            log.error("worker failed to start", extra={"worker": worker.index, "error": str(exc)})
            worker.proc, worker.returncode = None, 127
            worker.status = worker.returncode
            self._restart_or_give_up(worker, lived=0.0)
            return
        worker.proc, worker.pidfd, worker.returncode = proc, os.pidfd_open(proc.pid), None
        worker.started_at = self.loop.time()
        worker.exited = self.loop.create_future()
        self.loop.add_reader(worker.pidfd, self._on_exit, worker)
        log.info("worker started", extra={"worker": worker.index, "pid": proc.pid,
                                          "generation": worker.generation})

    def _on_exit(self, worker: _Worker) -> None:
        assert worker.proc is not None and worker.exited is not None
        self.loop.remove_reader(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = -1
        worker.returncode = worker.proc.wait()      # the pidfd is readable: it has exited
        worker.exited.set_result(worker.returncode)
        if not (self.stopping and worker.returncode == -signal.SIGTERM):
            # Else the stop's SIGTERM killed it by the default action, so it was still
            # starting (a worker catches SIGTERM from before it listens, main.serve):
            # it had nobody to drain, and its previous run's status stands.
            worker.status = worker.returncode
        if self.stopping or self.together is not None:
            return          # stopped on purpose
        if worker.returncode == EXIT_STOP_RELAY:
            log.critical("worker cannot go on: stopping every worker",
                         extra={"worker": worker.index, "pid": worker.proc.pid})
            self.stop_requested.set()
            return
        log.warning("worker exited", extra={"worker": worker.index, "pid": worker.proc.pid,
                                            "generation": worker.generation,
                                            "returncode": worker.returncode})
        self._restart_or_give_up(worker, self.loop.time() - worker.started_at)

    def _restart_or_give_up(self, worker: _Worker, lived: float) -> None:
        if self.stop_requested.is_set():
            # Stopping already (a signal, or another worker gave up): two workers that
            # died in the same loop turn must not both give up, nor one be restarted.
            return
        backoff = self.config.backoff
        if lived >= backoff.reset_after:
            worker.next_delay = backoff.initial
        worker.failed_starts = worker.failed_starts + 1 if lived < backoff.startup else 0
        if worker.failed_starts >= backoff.give_up_after:
            self._give_up(worker)
            return
        self._schedule_restart(worker)

    def _give_up(self, worker: _Worker) -> None:
        """Stop the relay: this worker died at start-up too often for a restart to help."""
        log.critical("worker keeps failing at start-up: stopping the relay", extra={
            "worker": worker.index, "failed_starts": worker.failed_starts,
            "returncode": worker.returncode})
        print(f"fenghuo: worker {worker.index} exited {worker.failed_starts} times in a row "
              f"within {self.config.backoff.startup:g} s of starting (last status "
              f"{worker.returncode}); giving up (its own error is above)",
              file=sys.stderr, flush=True)
        self.gave_up = True
        self.stop_requested.set()

    def _schedule_restart(self, worker: _Worker) -> None:
        """Start it again after the backoff, whatever its exit code.

        Even a clean exit is restarted: while a worker is missing nobody
        drains its inbound rings, and every peer sending to it stalls.
        """
        if self.stopping:
            return
        delay = worker.next_delay
        worker.next_delay = min(delay * 2, self.config.backoff.maximum)
        worker.restarts += 1
        if self.config.restart_together:
            self.together = self.loop.create_task(self._restart_all(worker, delay))
        else:
            worker.restart = self.loop.call_later(delay, self._spawn, worker)

    async def _restart_all(self, dead: _Worker, delay: float) -> None:
        """Stop the living workers (gracefully: their clients get GOAWAY), then start
        every worker on new rings with a new boot id, ``delay`` after ``dead`` died.

        New rings: what the old generations left in them (publishes, answers
        for connections gone) means nothing to the new ones.
        """
        for worker in self.workers:
            if worker is not dead and worker.running:
                worker.restarts += 1
        await self._stop_workers(self.config.drain_timeout)
        await asyncio.sleep(delay)
        self.together = None
        if self.stopping:
            return
        for ring in self.rings.values():
            ring.close()
        self.rings = _mesh_rings(len(self.workers), self.config.ring_capacity)
        self.env["FENGHUO_BOOT"] = new_boot_id()
        log.warning("every worker started again: a new epoch", extra={"worker": dead.index})
        for worker in self.workers:
            if not worker.running:
                self._spawn(worker)

    def _signal_running(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.proc is not None
                worker.proc.send_signal(sig)

    async def _stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL what is left after the drain timeout."""
        self.stopping = True
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        if self.together is not None:
            self.together.cancel()
        log.info("stopping workers", extra={"drain_timeout": self.config.drain_timeout})
        await self._stop_workers(self.config.drain_timeout)

    async def _stop_workers(self, timeout: float) -> None:
        """SIGTERM every running worker, SIGKILL what is left after ``timeout``."""
        self._signal_running(signal.SIGTERM)
        if not await self._all_exited(timeout):
            log.warning("workers still running after the drain timeout: killing them",
                        extra={"workers": [w.index for w in self.workers if w.running]})
            self._signal_running(signal.SIGKILL)
            await self._all_exited(KILL_WAIT)

    async def _all_exited(self, timeout: float) -> bool:
        pending = [w.exited for w in self.workers if w.running and w.exited is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        return not any(w.running for w in self.workers)

    # ------------------------------------------------------------ /healthz and /metrics

    async def _healthz(self) -> httpd.Response:
        """200 only while every worker runs (and, with worker metrics, says it is healthy).

        A process that is alive may not listen yet (it is still starting) or
        no longer (it drains), or, on a cluster node, have lost its engine; with
        worker metrics on, its own /healthz tells (503, and why: its body is
        kept, its ``cluster`` object included).
        """
        said = await self._ask_workers("/healthz")
        ready = {k for k, (code, _) in said.items() if code == 200}
        checked = bool(self.config.metrics_port)
        healthy = not self.stopping and all(
            w.running and (not checked or w.index in ready) for w in self.workers)
        status = "draining" if self.stopping else "ok" if healthy else "degraded"
        answers = _health_bodies({k: body for k, (_, body) in said.items()})
        clusters = {k: body["cluster"] for k, body in answers.items()
                    if isinstance(body.get("cluster"), dict)}
        body = orjson.dumps({
            "status": status, **_relay_health(answers.values()),
            **({"cluster": _node_cluster(clusters, len(self.workers))} if clusters else {}),
            "uptime": round(self.loop.time() - self.started_at, 3), "workers": [
                {"index": w.index, "running": w.running, "generation": w.generation,
                 "pid": w.proc.pid if w.proc is not None else None, "restarts": w.restarts,
                 **({"healthy": w.index in ready} if checked else {}),
                 **({"cluster": clusters[w.index]} if w.index in clusters else {})}
                for w in self.workers]})
        return httpd.json_response(200 if healthy else 503, body)

    async def _scrape_workers(self, path: str) -> dict[int, str]:
        """``GET path`` from every running worker's metrics port: the 200 answers by worker."""
        return {k: body for k, (code, body) in (await self._ask_workers(path)).items()
                if code == 200}

    async def _ask_workers(self, path: str) -> dict[int, tuple[int, str]]:
        """``GET path`` from every running worker's metrics port: status and body by
        worker, for those that answered."""
        if not self.config.metrics_port:
            return {}
        running = [w for w in self.workers if w.running]
        answers = await asyncio.gather(*(
            httpd.fetch(self.config.metrics_host, self.config.worker_metrics_port(w.index), path)
            for w in running))
        return {w.index: answer for w, answer in zip(running, answers, strict=True)
                if answer is not None}

    async def _metrics(self) -> httpd.Response:
        scraped = await self._scrape_workers("/metrics")
        return httpd.metrics_response(Families([*self._own_metrics(scraped),
                                               *merge_worker_metrics(scraped)]))

    def _own_metrics(self, scraped: Mapping[int, str]) -> Iterator[Metric]:
        workers = self.workers
        yield metrics.build_info()
        yield metrics.gauge("fenghuo_supervisor_workers", "Workers the supervisor keeps.", len(workers))
        yield metrics.gauge("fenghuo_supervisor_workers_running", "Worker processes alive.",
                            sum(w.running for w in workers))
        yield per_worker(CounterMetricFamily, "fenghuo_supervisor_restarts",
                         "Worker restarts, by worker.", {w.index: w.restarts for w in workers})
        yield per_worker(GaugeMetricFamily, "fenghuo_supervisor_worker_generation",
                         "Generation of each worker (restarts so far, the current process included).",
                         {w.index: w.generation for w in workers})
        yield per_worker(GaugeMetricFamily, "fenghuo_supervisor_worker_scraped",
                         "1 if the worker's own /metrics answered this scrape.",
                         {w.index: int(w.index in scraped) for w in workers})
        used = GaugeMetricFamily("fenghuo_mesh_ring_used_bytes",
                                 "Bytes in the ring from one worker to another, not yet drained.",
                                 labels=("from", "to"))
        for (i, j), ring in self.rings.items():
            used.add_metric((str(i), str(j)), ring.used)
        yield used
        yield metrics.gauge("fenghuo_mesh_ring_capacity_bytes", "Capacity of each mesh ring.",
                            self.config.ring_capacity)


def _mesh_rings(count: int, capacity: int) -> dict[tuple[int, int], ShmRing]:
    """One ring per ordered pair of ``count`` workers: (i, j) written by i, drained by j."""
    return {(i, j): ShmRing.create(capacity)
            for i in range(count) for j in range(count) if i != j}


def _health_bodies(answers: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    """The workers' ``/healthz`` JSON objects by worker; an answer that is not one is left
    out (not a worker's: someone else holds its port)."""
    bodies = {}
    for worker, answer in answers.items():
        try:
            body = orjson.loads(answer)
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict):
            bodies[worker] = body
    return bodies


def _relay_health(bodies: Iterable[dict[str, Any]]) -> dict[str, object]:
    """What one relay's ``/healthz`` says, for the workers' answers together.

    So a health check reads the same fields whatever the number of workers:
    the epoch (one for all of them) and the connections (their sum).
    """
    bodies = list(bodies)
    return {"epoch": next((b["epoch"] for b in bodies if "epoch" in b), None),
            "connections": sum(b.get("connections", 0) for b in bodies)}


# A node's cluster counters: each worker's, summed over them (docs/DESIGN.md).
_NODE_SUMS = ("channels_owned", "appended", "appends", "refused", "failovers", "holes_filled",
              "forwards_deferred", "forwarded_publishes", "parked_sent_on_watch",
              "chats_received_unasked", "first_writes", "first_writes_refused",
              "publishes_redriven", "leader_stepdowns", "heads_behind",
              "heads_missed", "asks_repeated", "ask_records_received")


def _node_cluster(clusters: Mapping[int, dict[str, Any]], workers: int) -> dict[str, object]:
    """The node's cluster state from its workers' (each a participant): the engine is
    connected only while every worker says so, and the counters are summed; each
    worker's own object is under its entry of ``workers``."""
    states = list(clusters.values())
    return {"engine_connected": len(states) == workers
            and all(c.get("engine_connected") is True for c in states),
            "participants": sorted(str(c.get("node")) for c in states),
            **{key: sum(c.get(key, 0) for c in states) for key in _NODE_SUMS}}


def die_with(parent_pid: int) -> Callable[[], None]:
    """Child-side setup: get SIGTERM when the supervisor dies, even by SIGKILL.

    Without it a killed supervisor leaves workers serving with no one to
    restart them or drain a dead peer's rings.  The ``getppid`` check covers
    a supervisor that died between fork and ``prctl``.
    """
    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            os._exit(1)
    return preexec


def per_worker(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, help_: str,
               values: Mapping[int, float]) -> Metric:
    family = kind(name, help_, labels=("worker",))
    for worker, value in values.items():
        family.add_metric((str(worker),), value)
    return family


@dataclass(frozen=True)
class Families:
    """Metric families already made, as a collector for ``generate_latest``."""

    families: list[Metric]

    def collect(self) -> Iterator[Metric]:
        # One family once: the supervisor's and its workers' fenghuo_build_info share a name.
        merged: dict[str, Metric] = {}
        for family in self.families:
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
        yield from merged.values()


def merge_worker_metrics(texts: Mapping[int, str]) -> list[Metric]:
    """The workers' Prometheus texts as families: each once, every sample labelled ``worker="k"``.

    Read with prometheus-client's parser, so the text format's rules (one
    HELP/TYPE per family, its samples together) hold for the merged text.
    A body that does not parse is left out: not a worker's answer (someone
    else holds its port).
    """
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            merged.samples.extend(sample._replace(labels={"worker": str(worker), **sample.labels})
                                  for sample in family.samples)
    return list(families.values())
