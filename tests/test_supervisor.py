"""The supervisor (server/supervisor.py) as a real process: stop, kill, restart, health and metrics.

Workers are the small mesh program of ``tests/mesh_worker.py`` or real
``fenghuo serve`` processes.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import sys
import time

from prometheus_client.exposition import generate_latest

from fenghuo.server.supervisor import (EXIT_STOP_RELAY, EXIT_WORKERS_FAIL_TO_START,
                                        Families, merge_worker_metrics)
from mesh_worker import Supervised, alive

import fenghuo
from bench.targets import free_port, free_ports
from fenghuo.tokens import issue_token

WAIT = 30.0


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def until(condition, what: str, timeout: float = WAIT):
    """Poll ``condition`` (bounded) until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return value


def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(tmp_path):
    with Supervised(tmp_path, 3, worker_flags=["--records=10"]) as mesh:
        for k in range(3):
            mesh.file(f"result-{k}-0.json")           # each has its SIGTERM handler
        pids = mesh.worker_pids()
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
        assert mesh.stop() == 0
        assert not any(alive(pid) for pid in pids)
        assert "worker exited" not in mesh.log(), "a stopping worker is not restarted"


def test_a_worker_stopped_while_it_still_starts_is_a_clean_stop(tmp_path):
    # Seen in CI: `fenghuo serve` stopped while worker 0 was still starting exited 1.
    # A worker dies of SIGTERM's default action only before it installs its handler,
    # which it does before it listens (server/main.serve): nobody was dropped.
    with Supervised(tmp_path, 2, per_worker_args=[["--slow-start=30"], ["--stall=1-0"]]) as mesh:
        slow = mesh.file("started-0-0.json")["pid"]
        mesh.file("started-1-0.json")
        assert mesh.stop() == 0, mesh.log()
        assert not alive(slow)
        assert "worker exited" not in mesh.log(), "a stopping worker is not restarted"


def test_a_worker_ignoring_sigterm_is_killed_after_the_drain_timeout(tmp_path):
    with Supervised(tmp_path, 2, drain_timeout=1.0,
                    worker_flags=["--records=10", "--ignore-sigterm=1"]) as mesh:
        for k in range(2):
            mesh.file(f"result-{k}-0.json")
        pids = mesh.worker_pids()
        started = time.monotonic()
        assert mesh.stop() == 1, "a worker killed at the drain timeout is not a clean stop"
        assert time.monotonic() - started >= 1.0
        assert not any(alive(pid) for pid in pids)
        assert "killing them" in mesh.log()


def test_a_crashing_worker_is_restarted_with_doubling_delays_until_stopped(tmp_path):
    backoff = {"initial": 0.2, "maximum": 0.8, "give_up_after": 100}
    with Supervised(tmp_path, 2, backoff=backoff, worker_flags=["--crash=3"]) as mesh:
        starts = [mesh.file(f"started-0-{g}.json")["time"] for g in range(4)]
        assert mesh.stop() == 1, "the workers' last exit was 3"
        generations = len(list(mesh.dir.glob("started-0-*.json")))
        time.sleep(0.3)
        assert len(list(mesh.dir.glob("started-0-*.json"))) == generations, \
            "no restart after the stop"
        assert not any(alive(pid) for pid in mesh.worker_pids())
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= delay for gap, delay in zip(gaps, (0.2, 0.4, 0.8), strict=True)), gaps


def test_workers_dying_at_start_up_again_and_again_stop_the_relay_with_status_3(tmp_path):
    backoff = {"initial": 0.05, "maximum": 0.2}     # startup 10 s, give_up_after 5: defaults
    with Supervised(tmp_path, 2, backoff=backoff, worker_flags=["--crash=1"]) as mesh:
        assert mesh.proc.wait(WAIT) == EXIT_WORKERS_FAIL_TO_START, mesh.log()
        assert len(list(mesh.dir.glob("started-0-*.json"))) <= 5
        assert not any(alive(pid) for pid in mesh.worker_pids())
    # One line for the person at the terminal, besides the structured log.
    lines = [line for line in mesh.log().splitlines() if line.startswith("fenghuo: ")]
    assert len(lines) == 1 and "5 times in a row" in lines[0] and "giving up" in lines[0], lines


def test_a_worker_that_cannot_go_on_stops_the_others_and_the_supervisor_exits_1(tmp_path):
    # Worker 0 exits as a worker whose store failed does, once worker 1 has
    # started (else the supervisor may stop worker 1 before it says so); worker 1 waits.
    with Supervised(tmp_path, 2, per_worker_args=[[f"--crash={EXIT_STOP_RELAY}",
                                                   "--crash-when=started-1-0.json"],
                                                  ["--stall=1-0"]]) as mesh:
        survivor = mesh.file("started-1-0.json")["pid"]
        assert mesh.proc.wait(WAIT) == 1, mesh.log()
        assert not alive(survivor)
        assert not list(mesh.dir.glob("started-0-1.json")), "not restarted"
        assert "worker cannot go on" in mesh.log()


def test_metrics_merge_regroups_families_and_labels_every_sample():
    worker_text = ("# HELP up_total Ups.\n# TYPE up_total counter\nup_total 3\n"
                   "# HELP lat Latency.\n# TYPE lat histogram\n"
                   'lat_bucket{le="0.1"} 1\nlat_bucket{le="+Inf"} 2\nlat_sum 0.3\nlat_count 2\n')
    merged = merge_worker_metrics({0: worker_text, 1: worker_text.replace(" 3\n", " 5\n"),
                                   2: "<html>someone else's port</html>"})
    # prometheus-client writes floats and sorts labels by name.
    assert generate_latest(Families(merged)).decode().splitlines() == [
        "# HELP up_total Ups.", "# TYPE up_total counter",
        'up_total{worker="0"} 3.0', 'up_total{worker="1"} 5.0',
        "# HELP lat Latency.", "# TYPE lat histogram",
        'lat_bucket{le="0.1",worker="0"} 1.0', 'lat_bucket{le="+Inf",worker="0"} 2.0',
        'lat_sum{worker="0"} 0.3', 'lat_count{worker="0"} 2.0',
        'lat_bucket{le="0.1",worker="1"} 1.0', 'lat_bucket{le="+Inf",worker="1"} 2.0',
        'lat_sum{worker="1"} 0.3', 'lat_count{worker="1"} 2.0']


def health(port: int) -> tuple[int, dict]:
    """The supervisor's /healthz; (0, {}) while it does not listen yet."""
    try:
        status, body = http_get(port, "/healthz")
    except OSError:
        return 0, {}
    return status, json.loads(body)


async def test_real_fenghuo_serve_workers_behind_one_healthz_and_one_metrics(tmp_path):
    # fenghuo serve does not yet listen with SO_REUSEPORT, so each worker gets
    # its own client port here; the metrics ports follow the convention.
    metrics_port = free_ports(3)
    ports = [free_port(), free_port()]
    secret = "supervisor-test-secret-of-32-bytes-or-more"
    per_worker = [["--port", str(ports[k]), "--data-dir", str(tmp_path / f"data-{k}"),
                   "--store", "memory", f"--secret={secret}"] for k in range(2)]
    with Supervised(tmp_path, 2, metrics_port=metrics_port, per_worker_args=per_worker,
                    worker_cmd=[sys.executable, "-m", "fenghuo", "serve"]) as sup:
        body = until(lambda: (h := health(metrics_port))[0] == 200 and h[1], "healthy")
        assert [(w["generation"], w["healthy"]) for w in body["workers"]] == [(0, True)] * 2
        client = await fenghuo.connect(f"tcp://127.0.0.1:{ports[1]}",
                                       token=issue_token(secret, "ana"), reconnect=False)
        try:
            status, text = http_get(metrics_port, "/metrics")
            # The fields of one relay's /healthz, for both workers (here each
            # has its own store, hence its own epoch: the first is shown).
            summary = health(metrics_port)[1]
            assert summary["connections"] == 1 and isinstance(summary["epoch"], str)
        finally:
            await client.close()
        assert status == 200
        lines = text.splitlines()
        assert 'fenghuo_connections{worker="0"} 0.0' in lines
        assert 'fenghuo_connections{worker="1"} 1.0' in lines
        assert lines.count("# TYPE fenghuo_connections gauge") == 1
        assert 'fenghuo_supervisor_workers_running 2.0' in lines
        assert 'fenghuo_supervisor_worker_scraped{worker="1"} 1.0' in lines
        assert any(line.startswith('fenghuo_publish_to_deliver_seconds_bucket{le=') and 'worker="1"' in line
                   for line in lines)
        assert 'fenghuo_mesh_ring_used_bytes{from="0",to="1"} 0.0' in lines

        os.kill(body["workers"][1]["pid"], signal.SIGKILL)
        body = until(lambda: (h := health(metrics_port))[0] == 200
                     and h[1]["workers"][1]["generation"] == 1 and h[1], "restarted")
        assert body["workers"][1]["restarts"] == 1 and body["workers"][0]["restarts"] == 0
        status, text = until(lambda: (m := http_get(metrics_port, "/metrics"))[1].count(
            'fenghuo_connections{worker="') == 2 and m, "the new worker scraped")
        assert 'fenghuo_supervisor_restarts_total{worker="1"} 1.0' in text.splitlines()
        pids = [w["pid"] for w in body["workers"]]
        assert sup.stop() == 0
    assert not any(alive(pid) for pid in pids)


async def test_a_relay_s_supervisor_and_workers_import_no_token_signing_library(tmp_path):
    """A relay verifies tokens in the core; PyJWT (and the cryptography it loads)
    only signs them, and was 0.3-0.5 s of each supervisor's and worker's start.
    Python's own import log (PYTHONPROFILEIMPORTTIME, on stderr: the relay's log)
    names every module each process imported."""
    import re

    from conftest import start_relay

    relay = start_relay(tmp_path, workers=2, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        client = await relay.connect("ana")     # a token checked by a worker
        await client.close()
    finally:
        assert relay.stop() == 0
    log = relay.log()
    assert len(re.findall(r"\| fenghuo\.server\.main$", log, re.MULTILINE)) == 3, log[-2000:]
    assert re.findall(r"\| +(?:jwt|cryptography)$", log, re.MULTILINE) == []
