"""The suite's plan: which scenario runs on which target, in what order.

The generator's ceiling (the echo target) is measured first, so every later
result can say how close it came to it.  fenghuo is compared with the
pub/sub peers on its in-memory store, since neither peer persists anything;
the durable store is measured on its own, at every ``--fsync`` setting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import loadgen

FENGHUO_VS_PEERS = ("--store", "memory")
FSYNC_MODES = ("always", "batch", "off")
# Idempotency windows (--dedupe-window, keys per channel) at which keyed and
# unkeyed publishing are compared: from small to sixteen times the default.
DEDUPE_WINDOWS = (256, 4096, 16384, 65536)


@dataclass(frozen=True)
class Deployment:
    """How fenghuo is started for a row: its worker processes and its flags."""
    name: str
    workers: int
    flags: tuple[str, ...]


# One process on the in-memory store: the closest to the peers.
ONE_WORKER = Deployment("1 worker, memory", 1, ("--workers", "1", *FENGHUO_VS_PEERS))
# What `fenghuo serve` runs with no flags: one worker per core (a supervisor),
# the durable SQLite store, --fsync always.
DEFAULT = Deployment("default", os.cpu_count() or 1, ())
DEPLOYMENTS = {"one": ONE_WORKER, "default": DEFAULT}


@dataclass(frozen=True)
class Sizes:
    warmup: float
    duration: float
    pairs: int                  # many-to-many
    latency_pairs: int
    rates: tuple[float, ...]
    fan_out: tuple[int, ...]
    connections: int


# connections: as many as one server process may hold here.  The server and
# the generator each need one descriptor per connection and both run under
# a 20,000 open-file limit; redis-server also keeps some for itself.
FULL = Sizes(warmup=1.0, duration=5.0, pairs=1000, latency_pairs=100,
             rates=(10_000, 50_000), fan_out=(100, 1000, 10_000), connections=18_000)
QUICK = Sizes(warmup=0.2, duration=0.5, pairs=10, latency_pairs=10,
              rates=(1_000,), fan_out=(10, 100), connections=200)


@dataclass(frozen=True)
class Item:
    group: str
    target: str
    relay_flags: tuple[str, ...]
    name: str
    scenario: Callable[..., Any]
    workers: int = 1
    deployment: str = ""

    @property
    def label(self) -> str:
        flags = " ".join((*(() if self.workers == 1 else (f"--workers {self.workers}",)),
                          *self.relay_flags))
        return f"{self.target}{f' ({flags})' if flags else ''} {self.name}"


def _pairs(s: Sizes, pairs: int, rate: float | None = None, keyed: bool = False,
           random_keys: bool = False):
    return lambda target, progress: loadgen.pairs_run(
        target, pairs=pairs, rate=rate, warmup=s.warmup, duration=s.duration, progress=progress,
        keyed=keyed, random_keys=random_keys)


def _fan_out(s: Sizes, members: int):
    return lambda target, progress: loadgen.fan_out_run(
        target, members=members, warmup=s.warmup, duration=s.duration, progress=progress)


def _connections(s: Sizes):
    return lambda target, progress: loadgen.connections_run(
        target, connections=s.connections, progress=progress)


def _scenarios(s: Sizes, *, fan_out: bool = True, connections: bool = True):
    yield "throughput", "one-to-one", _pairs(s, 1)
    yield "throughput", f"many-to-many {s.pairs}", _pairs(s, s.pairs)
    if fan_out:
        for members in s.fan_out:
            yield "fan-out", f"fan-out {members}", _fan_out(s, members)
    for rate in s.rates:
        yield "latency", f"latency @ {rate:,.0f}/s", _pairs(s, s.latency_pairs, rate)
    if connections:
        yield "connections", f"{s.connections} connections", _connections(s)


KEY_ORDERS = ("counted", "random")


def keys_plan(s: Sizes, windows: tuple[int, ...] = DEDUPE_WINDOWS, repeat: int = 1,
              deployments: tuple[Deployment, ...] = (ONE_WORKER, DEFAULT),
              orders: tuple[str, ...] = ("counted",)) -> list[Item]:
    """fenghuo one-to-one without keys and with a new key per publish, per
    deployment and window size; the keys counted up (a sender's keys grow,
    as the Python client's do) and/or ``random`` (unique, in no order).

    The runs of a window alternate, unkeyed then keyed, ``repeat`` times, so
    their ratio is as little disturbed by the machine's other load as the
    run allows (the table takes the best of each).
    """
    items = []
    for d in deployments:
        for window in windows:
            flags = (*d.flags, "--dedupe-window", str(window))
            items += [Item("keys", "fenghuo", flags, "one-to-one", _pairs(s, 1), d.workers, d.name),
                      *(Item("keys", "fenghuo", flags,
                             f"one-to-one keyed{' random' if order == 'random' else ''}",
                             _pairs(s, 1, keyed=True, random_keys=order == "random"),
                             d.workers, d.name) for order in orders)] * repeat
    return items


def deployments_plan(s: Sizes) -> list[Item]:
    """fenghuo one-to-one and many-to-many as one worker and as the default
    deployment, each without keys and with a new key on every publish (the
    Python client always sends one)."""
    return [Item("deployments", "fenghuo", d.flags, f"{name}{' keyed' if keyed else ''}",
                 _pairs(s, pairs, keyed=keyed), d.workers, d.name)
            for d in (ONE_WORKER, DEFAULT)
            for name, pairs in (("one-to-one", 1), (f"many-to-many {s.pairs}", s.pairs))
            for keyed in (False, True)]


GROUPS = ("ceiling", "throughput", "fan-out", "latency", "connections", "store", "keys",
          "deployments")


def plan(*, quick: bool, targets: list[str], groups: tuple[str, ...] = GROUPS) -> list[Item]:
    """Echo ceiling, then every scenario per target, then fenghuo's store modes.

    ``groups`` keeps only those groups' items (``--groups connections`` runs
    just the connect and memory scenario, every target side by side).
    """
    s = QUICK if quick else FULL
    items = [Item("ceiling", "echo", (), name, fn)
             for _, name, fn in _scenarios(s, fan_out=False, connections=False)]
    for target in targets:
        flags = FENGHUO_VS_PEERS if target.startswith("fenghuo") else ()
        items += [Item(group, target, flags, name, fn) for group, name, fn in _scenarios(s)]
    if "fenghuo" in targets:
        for mode in FSYNC_MODES:
            items += [Item("store", "fenghuo", ("--fsync", mode), name, fn)
                      for group, name, fn in _scenarios(s, fan_out=False, connections=False)
                      if name != "one-to-one"]
        items += deployments_plan(s)
        # The default window only: every window is `python -m bench keys`.
        items += keys_plan(s, (65536,))
    return [item for item in items if item.group in groups]
