"""The Locust load test, run for real: ``python -m loadtest`` (its own relay, headless,
one process and distributed) and ``locust -f loadtest/locustfile.py`` against a relay
started here, with a secret that does not match.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.report import Summary

PROJECT = Path(__file__).resolve().parent.parent

# What every scenario must show in a short run: (request type, name).
SCENARIO_ROWS = {
    "housing estate": [
        ("CONNECT", "billing"), ("CONNECT", "resident"),
        ("PUBLISH", "fee_reminder"), ("DELIVER", "fee_reminder"),
        ("RECEIPT", "fee_reminder read"), ("READ", "fee_reminder"),
        ("PUBLISH", "resident_question"), ("DELIVER", "resident_question"),
        ("PUBLISH", "estate_notice"), ("DELIVER", "estate_notice"),
    ],
    "bank advisory chat": [
        ("CONNECT", "customer"), ("CONNECT", "bot"), ("CONNECT", "advisor"),
        ("PUBLISH", "customer_question"), ("DELIVER", "customer_question"),
        ("PUBLISH", "bot_answer"), ("DELIVER", "bot_answer"),
        ("GROUP", "handover"), ("DELIVER", "handover"), ("HISTORY", "advice conversation"),
        ("PUBLISH", "advisor_answer"), ("DELIVER", "advisor_answer"),
        ("ANSWER", "bot_answer"), ("ANSWER", "advisor_answer"),
    ],
    "retail chain": [
        ("CONNECT", "hq"), ("CONNECT", "store"), ("SUBSCRIBE", "store channel"),
        ("PUBLISH", "chain_announcement"), ("DELIVER", "chain_announcement"),
        ("PUBLISH", "region_announcement"), ("DELIVER", "region_announcement"),
        ("RECEIPT", "announcement read"), ("READ", "chain_announcement"),
        ("CURSOR", "readers"),
    ],
}


def run_loadtest(out: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``python -m loadtest --out OUT ARGS``, in a session of its own so that nothing it
    started (relay, Locust master and workers) outlives the test."""
    proc = subprocess.Popen([sys.executable, "-m", "loadtest", "--out", str(out), *args],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()   # the runner stops its relay and Locust on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"python -m loadtest ran past {timeout} s:\n{stdout}{stderr}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)   # stragglers only: normally none is left
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_every_scenario_ran(out: Path, result: subprocess.CompletedProcess) -> Summary:
    """Exit 0, both reports written, every scenario's rows counted without a failure."""
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "report.html").stat().st_size > 0
    summary = Summary.load(out / "stats")
    assert summary.total is not None and int(summary.total["Failure Count"]) == 0
    for scenario, rows in SCENARIO_ROWS.items():
        for request_type, name in rows:
            row = summary.row(request_type, name)
            assert row is not None, f"{scenario}: no {request_type} {name} row\n{summary.render()}"
            assert int(row["Request Count"]) > 0, f"{scenario}: {request_type} {name} never counted"
            assert int(row["Failure Count"]) == 0
    assert "DELIVER" in result.stdout and "all requests" in result.stdout   # the printed summary
    return summary


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_headless_run_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_loadtest(out, "--users", "15", "--spawn-rate", "15", "--time", "8s")
    summary = assert_every_scenario_ran(out, result)
    # The retail head office asked the relay who had read its announcements.
    assert summary.readers["expected"] > 0 and summary.readers["read"] > 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_distributed_run_with_two_workers(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = run_loadtest(out, "--users", "30", "--spawn-rate", "30", "--time", "8s",
                          "--workers", "2")
    assert_every_scenario_ran(out, result)
    command = (out / "command.txt").read_text()
    assert "--master" in command and command.count("--worker ") == 2
    # Each worker ran users of every class, so each paired its own users completely.
    worker_logs = "".join(p.read_text() for p in sorted(out.glob("worker-*.log")))
    for index in (0, 1):
        assert f"worker {index} runs {{" in worker_logs, worker_logs
    assert "to pair them with" not in worker_logs


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_wrong_secret_is_reported_as_connect_failures(relay, tmp_path: Path) -> None:
    """Users whose tokens the relay refuses fail CONNECT with TOKEN_INVALID; nothing crashes."""
    prefix = tmp_path / "stats"
    locust = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
        "--host", relay.server, "--users", "3", "--spawn-rate", "3", "--run-time", "3s",
        "--only-summary", "--csv", str(prefix), "Resident", "Store", "BankCustomer",
        cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "FENGHUO_SECRET": "not-the-relays-secret-" + "x" * 16})
    try:
        output = (await asyncio.wait_for(locust.communicate(), 45))[0].decode()
    finally:
        if locust.returncode is None:
            locust.kill()
            await locust.wait()
    assert locust.returncode == 1, output   # Locust's status when requests failed
    assert "Traceback" not in output
    summary = Summary.load(prefix)
    connects = [r for r in summary.requests if r["Type"] == "CONNECT"]
    assert connects and all(int(r["Failure Count"]) == int(r["Request Count"]) > 0
                            for r in connects)
    assert {r["Type"] for r in summary.requests} == {"CONNECT"}   # nothing got further
    errors = {f["Error"] for f in summary.failures}
    assert errors and all("[120] TOKEN_INVALID" in e for e in errors), errors
    assert summary.problems()
