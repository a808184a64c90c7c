"""``python -m loadtest``: a headless Locust run against a relay of its own, end to end.

It starts ``fenghuo serve`` (a free port, a temporary data directory, the
secret in ``FENGHUO_SECRET``), runs Locust headless on ``loadtest/locustfile.py``
(one process, or with ``--workers N`` one ``--master`` and N ``--worker``
processes on this machine), writes the CSV and HTML reports into the output
folder, stops everything, prints a summary per request name and exits non-zero
when any request failed or nothing was delivered.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import IO

from bench.targets import free_port
from loadtest.report import Summary

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
LOCUSTFILE = HERE / "locustfile.py"
READY_TIMEOUT = 30.0   # seconds for the relay to listen and the workers to report
STOP_TIMEOUT = 30.0    # seconds after the run time for Locust to write its reports and exit
GRACE = 5.0            # seconds a process that should be exiting gets before it is stopped
_TIMESPAN = re.compile(r"(\d+)\s*([hms])")


def run_seconds(timespan: str) -> int:
    """Locust's ``--run-time`` (``30``, ``30s``, ``2m``, ``1h30m``) in seconds."""
    if timespan.strip().isdigit():
        return int(timespan)
    parts = _TIMESPAN.findall(timespan)
    if not parts or _TIMESPAN.sub("", timespan).strip():
        raise argparse.ArgumentTypeError(f"not a run time: {timespan!r} (e.g. 30s, 2m, 1h30m)")
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts)


def checked_timespan(timespan: str) -> str:
    """``timespan`` unchanged, after checking it is one (for argparse)."""
    run_seconds(timespan)
    return timespan


def start_relay(data_dir: str, secret: str, flags: list[str], log: IO[bytes]) -> tuple[subprocess.Popen, int]:
    """``fenghuo serve`` on a port the kernel picks; returns it once it listens.

    The relay prints ``fenghuo listening on HOST:PORT`` on stdout when ready
    (each of several workers ``fenghuo worker K of N listening on HOST:PORT``);
    its logs (stderr), and anything else it prints, go to ``log``.
    """
    cmd = [sys.executable, "-m", "fenghuo", "serve", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "0", "--data-dir", data_dir, "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                            env={**os.environ, "FENGHUO_SECRET": secret})
    assert proc.stdout is not None
    found: list[int] = []
    ready = threading.Event()

    def copy_stdout() -> None:
        # Also keeps draining the pipe after the line we wait for, so the relay never blocks on it.
        for line in proc.stdout:  # type: ignore[union-attr]
            # One process says "fenghuo listening on", a worker of several
            # "fenghuo worker K of N listening on": the first one listening will do.
            match = re.match(rb"fenghuo (?:worker \d+ of \d+ )?listening on [^:]+:(\d+)", line)
            if match and not found:
                found.append(int(match.group(1)))
                ready.set()
            log.write(line)
            log.flush()
        ready.set()

    threading.Thread(target=copy_stdout, daemon=True).start()
    if not ready.wait(READY_TIMEOUT) or not found:
        stop(proc)
        raise RuntimeError(f"the relay did not start (exit status {proc.poll()}); see {log.name}")
    return proc, found[0]


def locust_commands(args: argparse.Namespace, host: str, out: Path) -> tuple[list[str], list[list[str]]]:
    """The command of the headless Locust process (master if distributed) and of each worker."""
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", host]
    headless = [*base, "--headless", "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
                "--run-time", args.time, "--stop-timeout", "0", "--only-summary",
                "--csv", str(out / "stats"), "--html", str(out / "report.html")]
    if not args.workers:
        return headless, []
    port = str(free_port())
    master = [*headless, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
              "--expect-workers", str(args.workers),
              "--expect-workers-max-wait", str(int(READY_TIMEOUT))]
    worker = [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", port]
    return master, [worker] * args.workers


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``timeout``); its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_locust(args: argparse.Namespace, host: str, secret: str, out: Path) -> int:
    """Run the headless test (and its workers); Locust's exit status."""
    master_cmd, worker_cmds = locust_commands(args, host, out)
    env = {**os.environ, "FENGHUO_SECRET": secret}
    (out / "command.txt").write_text(shlex.join(master_cmd) + "\n"
                                     + "".join(shlex.join(c) + "\n" for c in worker_cmds))
    started: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log_name: str) -> subprocess.Popen:
        with open(out / log_name, "wb") as log:
            started.append(subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT))
        return started[-1]

    try:
        for i, cmd in enumerate(worker_cmds):
            spawn(cmd, f"worker-{i}.log")
        master = spawn(master_cmd, "locust.log")
        try:
            return master.wait(run_seconds(args.time) + READY_TIMEOUT + STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"loadtest: Locust did not finish in time; stopping it (see {out / 'locust.log'})",
                  file=sys.stderr)
            return 124
    finally:
        # Normally the master has exited and told its workers to quit; this stops
        # whatever is left after a timeout or an interruption.
        for proc in reversed(started):
            try:
                proc.wait(GRACE)
            except subprocess.TimeoutExpired:
                stop(proc)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=60, help="concurrent Locust users (default 60)")
    p.add_argument("--spawn-rate", type=float, default=20, help="users started per second (default 20)")
    p.add_argument("--time", default="30s", type=checked_timespan,
                   help="run time, Locust syntax: 30s, 2m... (default 30s)")
    p.add_argument("--workers", type=int, default=0,
                   help="distributed mode: one master and this many worker processes (default 0)")
    p.add_argument("--out", type=Path, help="report folder (default loadtest/reports/<timestamp>)")
    p.add_argument("--relay", default="", metavar="FLAGS",
                   help='extra `fenghuo serve` flags, e.g. "--fsync batch" or "--store memory"')
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the relay and Locust are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = (args.out or HERE / "reports" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    mode = f"{args.workers} workers" if args.workers else "one process"
    with TemporaryDirectory(prefix="fenghuo-loadtest-") as data_dir, \
            open(out / "relay.log", "wb") as relay_log:
        try:
            relay, port = start_relay(data_dir, secret, shlex.split(args.relay), relay_log)
        except RuntimeError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            return 2
        print(f"loadtest: relay on 127.0.0.1:{port}; {args.users} users, {args.time}, {mode}; "
              f"reports in {out}", flush=True)
        try:
            status = run_locust(args, f"tcp://127.0.0.1:{port}", secret, out)
        finally:
            relay_status = stop(relay)
    summary = Summary.load(out / "stats")
    print(summary.render())
    problems = summary.problems()
    if status not in (0, 1):   # 1 is Locust's "some requests failed", already in problems
        problems.append(f"Locust exited with status {status} (see {out / 'locust.log'})")
    if relay_status not in (0, None):
        problems.append(f"the relay exited with status {relay_status} (see {out / 'relay.log'})")
    for problem in problems:
        print(f"loadtest: FAILED: {problem}")
    print(f"loadtest: HTML report {out / 'report.html'}, CSV {out / 'stats_stats.csv'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
