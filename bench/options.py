"""Command-line options shared by the bench commands that run load scenarios."""

from __future__ import annotations

import argparse


def add_scenario_options(p: argparse.ArgumentParser, *, members: int, pairs: int,
                         pairs_help: str = "latency: publisher/subscriber pairs") -> None:
    """The sizes, rate and timing every load scenario command takes, one definition."""
    p.add_argument("--pairs", type=int, default=pairs, help=pairs_help)
    p.add_argument("--members", type=int, default=members, help="fan-out: group size")
    p.add_argument("--rate", type=float, default=10_000, help="latency: messages/s offered in all")
    p.add_argument("--connections", type=int, default=5000, help="connect rate: how many")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)


def add_publish_options(p: argparse.ArgumentParser, *, count: int) -> None:
    """How many publishes a measurement makes, how many in flight, how large."""
    p.add_argument("--count", type=int, default=count, help="publishes per measurement")
    p.add_argument("--concurrency", type=int, default=64, help="publishes in flight")
    p.add_argument("--payload", type=int, default=64, help="payload bytes")
