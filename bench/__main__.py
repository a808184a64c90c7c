"""``python -m bench run SCENARIO``: start a relay, drive it, print the figures.

The relay runs as a real ``fenghuo serve`` subprocess pinned to CPU 0; the
generator runs in this process pinned to CPU 1 (on a machine with two cores
each gets its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from tempfile import TemporaryDirectory

import uvloop

from bench import loadgen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:
        os.sched_setaffinity(0, {cpu})


def start_relay(data_dir: str, secret: str, *extra: str,
                target: str = "fenghuo") -> tuple[subprocess.Popen, int, int]:
    port, metrics_port = _free_port(), _free_port()
    if target == "asyncio":
        cmd = [sys.executable, "-m", "bench.peers.asyncio_relay", "--port", str(port),
               f"--secret={secret}"]
        metrics_port = 0
    else:
        cmd = [sys.executable, "-m", "fenghuo", "serve", "--port", str(port),
               "--metrics-port", str(metrics_port),
               "--data-dir", data_dir, f"--secret={secret}", "--rate", "1e12", "--burst", "1e12",
               "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: _pin(0), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, metrics_port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("relay did not start")


def server_latency(metrics_port: int) -> dict[str, float]:
    """p50/p99/p99.9 of ``fenghuo_publish_to_deliver_seconds``, as bucket upper bounds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = [(float(m.group(1)), int(m.group(2))) for m in re.finditer(
        r'^fenghuo_publish_to_deliver_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M)]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return {}
    return {name: next(le for le, count in buckets if count >= q * total)
            for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))}


SCENARIOS = {
    "one-to-one": lambda a, relay, port, secret: loadgen.one_to_one(
        "127.0.0.1", port, secret, pairs=a.pairs, payload=a.payload, duration=a.duration,
        window=a.window),
    "fan-out": lambda a, relay, port, secret: loadgen.fan_out(
        "127.0.0.1", port, secret, members=a.members, payload=a.payload, duration=a.duration),
    "idle": lambda a, relay, port, secret: loadgen.idle_connections(
        "127.0.0.1", port, secret, relay.pid, connections=a.connections),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario against a fresh relay")
    run.add_argument("scenario", choices=sorted(SCENARIOS))
    run.add_argument("--pairs", type=int, default=100)
    run.add_argument("--members", type=int, default=100)
    run.add_argument("--payload", type=int, default=64)
    run.add_argument("--window", type=int, default=256,
                     help="one-to-one: publishes in flight per sender")
    run.add_argument("--duration", type=float, default=5.0)
    run.add_argument("--connections", type=int, default=5000, help="idle: how many")
    run.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    run.add_argument("--target", choices=("fenghuo", "asyncio"), default="fenghuo",
                     help="the relay to drive: fenghuo, or the plain-asyncio baseline peer")
    run.add_argument("--relay", default="", metavar="FLAGS",
                     help='extra `fenghuo serve` flags, e.g. "--fsync batch" or "--store memory"')
    args = parser.parse_args(argv)
    secret = secrets.token_urlsafe(32)
    with TemporaryDirectory() as data_dir:
        proc, port, metrics_port = start_relay(data_dir, secret, *shlex.split(args.relay),
                                               target=args.target)
        try:
            _pin(1)
            result = uvloop.run(SCENARIOS[args.scenario](args, proc, port, secret))
            latency = server_latency(metrics_port) if metrics_port else {}
        finally:
            proc.terminate()
            proc.wait(10)
    print(result.line())
    if latency:
        print("relay publish-to-deliver (server histogram, bucket upper bounds): "
              + ", ".join(f"{q} <= {v * 1000:g} ms" for q, v in latency.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(result), "relay_latency_s": latency},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
