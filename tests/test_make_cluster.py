"""The README's local cluster as a new user meets it: ``make cluster``'s script.

``scripts/nats_cluster.py --nodes N`` (what ``make cluster`` runs) starts three
nats-servers on free ports and N fenghuo nodes; the README's status command
needs the servers' URLs, so the script prints that command with them, and
the printed line works as it stands.  Ctrl-C stops everything, nats-servers
and their stores included.  Real processes throughout.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.targets import free_ports, peer_binary

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 90.0
pytestmark = pytest.mark.skipif(peer_binary("nats-server") is None,
                                reason="nats-server is not installed")


def _read_until(proc: subprocess.Popen, wanted: list[str], deadline: float) -> list[str]:
    """The script's stdout lines until every string of ``wanted`` was in one."""
    lines: list[str] = []
    assert proc.stdout is not None
    while not all(any(w in line for line in lines) for w in wanted):
        assert time.monotonic() < deadline, f"never printed {wanted}: {lines}"
        line = proc.stdout.readline()
        assert line, f"the script ended: {lines}"
        lines.append(line.rstrip("\n"))
    return lines


def test_make_cluster_prints_a_status_command_that_works_and_ctrl_c_stops_it_all(
        tmp_path: Path) -> None:
    # Node k listens on port + k and serves metrics on port + 10 + k.
    port = free_ports(12)
    proc = subprocess.Popen(
        [sys.executable, "scripts/nats_cluster.py", "--nodes", "2", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = _read_until(proc, [f"listening on 127.0.0.1:{port},",
                                   f"listening on 127.0.0.1:{port + 1},"],
                           time.monotonic() + START_TIMEOUT)
        base = next(line for line in lines if line.startswith("NATS cluster:")).split(
            "(stores under ")[1].rstrip(")")
        printed = [line for line in lines if line.startswith("cluster status: ")]
        assert printed, f"no status command printed: {lines}"
        command = shlex.split(printed[0].removeprefix("cluster status: "))
        # Both nodes heartbeat within a lease of listening.
        deadline = time.monotonic() + 15
        while True:
            status = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
            if status.returncode == 0 and "2 nodes, 2 alive" in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(0.5)
        assert "node0" in status.stdout and "node1" in status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()
    left = subprocess.run(["pgrep", "-f", base], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes of the stopped cluster still run: {left}"
    assert not Path(base).exists()
