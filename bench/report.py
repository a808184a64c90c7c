"""A suite's results as files: ``results.json``, ``results.md`` and PNG plots.

Ratios are always "how many times better fenghuo is": throughput
fenghuo ÷ peer, latency and memory peer ÷ fenghuo.  Below 1 fenghuo is
behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.loadgen import Result
from bench.targets import peer_binary

RESULTS = Path(__file__).with_name("results")
#: columns beside fenghuo: itself over TLS and WebSocket (ratio: TCP ÷ that
#: transport), then the peers
PEERS = ("fenghuo-tls", "fenghuo-ws", "asyncio", "nats", "redis")


def machine() -> dict[str, Any]:
    """What a reader needs to compare a run with their own."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    assert mem is not None, "no MemTotal in /proc/meminfo"
    mem_kib = int(mem.group(1))
    facts: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
                             "kernel": platform.release(), "python": platform.python_version()}
    for name, flag in (("nats-server", "--version"), ("redis-server", "--version")):
        binary = peer_binary(name)
        if binary:
            facts[name] = subprocess.run([binary, flag], capture_output=True, text=True, check=False).stdout.strip()
    return facts


def default_dir(*, quick: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", machine()["cpu"].lower()).strip("-")[:40]
    name = f"{dt.date.today().isoformat()}-{os.cpu_count()}core-{slug}"
    return RESULTS / (name + ("-quick" if quick else ""))


def _label(r: dict[str, Any]) -> str:
    flags = r["extra"].get("relay_flags", "")
    if r["extra"].get("group") == "store":
        return f"fenghuo {flags}"
    return r["target"]


def _find(results: list[dict], group: str, scenario: str, target: str) -> dict | None:
    return next((r for r in results if r["extra"].get("group") == group
                 and r["scenario"] == scenario and r["target"] == target), None)


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _ratio(mine: float | None, theirs: float | None, *, lower_is_better: bool = False) -> str:
    if not mine or not theirs:
        return "–"
    return f"{(theirs / mine if lower_is_better else mine / theirs):.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _scenarios(results: list[dict], group: str) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["extra"].get("group") == group and r["scenario"] not in seen:
            seen.append(r["scenario"])
    return seen


def _comparison(results: list[dict], group: str, value, unit: str, *,
                lower_is_better: bool = False) -> str:
    peers = [p for p in PEERS if any(r["target"] == p for r in results)]
    header = ["scenario", f"fenghuo ({unit})", *(f"{p} ({unit})" for p in peers),
              *(f"× {p}" for p in peers)]
    rows = []
    for scenario in _scenarios(results, group):
        mine = _find(results, group, scenario, "fenghuo")
        theirs = [_find(results, group, scenario, p) for p in peers]
        mine_v = value(mine) if mine else None
        their_v = [value(t) if t else None for t in theirs]
        rows.append([scenario, _cell(mine_v)] + [_cell(v) for v in their_v] +
                    [_ratio(mine_v, v, lower_is_better=lower_is_better) for v in their_v])
    return _table(header, rows)


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return _si(value) if value >= 1000 else f"{value:.3g}"


def markdown(doc: dict[str, Any]) -> str:
    results = doc["results"]
    m = doc["machine"]
    ceiling = doc["generator_ceiling_bytes_per_s"]
    out = [f"# fenghuo benchmark suite, {doc['date']}{' (quick)' if doc['quick'] else ''}",
           "",
           (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
            f"Python {m['python']}; {m.get('nats-server', 'nats-server ?')}; "
            f"{m.get('redis-server', 'redis-server ?').split(' sha=')[0]}."),
           "",
           (f"Command: `{doc['command']}`. Servers on CPU 0, generator on CPU 1. 64-byte payloads. "
            "fenghuo runs `--store memory` against the peers (neither peer persists); "
            "the durable store has its own table. Ratios: how many times better fenghuo is "
            "(throughput fenghuo ÷ peer; latency and memory peer ÷ fenghuo); below 1 fenghuo is behind. "
            "`fenghuo-tls` and `fenghuo-ws` are fenghuo itself over TLS 1.3 and over WebSocket "
            "(the same relay flags): their ratios are what plain TCP gains over that transport "
            "(`python -m bench tls` and `python -m bench ws` compare them alone, with repeats)."),
           "",
           "## Throughput (deliveries/s)", "",
           _comparison(results, "throughput", lambda r: r["deliveries_per_s"], "/s"), "",
           "## Group fan-out (deliveries/s)", "",
           _comparison(results, "fan-out", lambda r: r["deliveries_per_s"], "/s"), "",
           "## Latency at a fixed offered rate (publish-to-deliver p99, ms)", "",
           _comparison(results, "latency", lambda r: r["latency_ms"].get("99"), "ms",
                       lower_is_better=True), "",
           _latency_detail(results), "",
           "## Connections (server memory per idle connection, bytes)", "",
           _comparison(results, "connections", lambda r: r["extra"]["bytes_per_connection"], "B",
                       lower_is_better=True), "",
           _connect_rates(results), "",
           "## Durable store (fenghuo, SQLite, per `--fsync`)", "",
           _store_table(results), "",
           "## Deployments (fenghuo as `--workers 1 --store memory` and as `fenghuo serve` "
           "with no flags: one worker per core, SQLite, `--fsync always`)", "",
           deployments_table(results), "",
           "## Idempotency keys (fenghuo one-to-one, per deployment and `--dedupe-window`; "
           "every window: `python -m bench keys`)", "",
           keys_table(results), "",
           "## Generator", "",
           (f"Ceiling (echo target, bytes in+out per second): {_si(ceiling)}B/s. "
            "Each row: the generator's own traffic as a share of that ceiling; "
            "near 100 % the generator, not the server, limits the figure."), "",
           _generator(results, ceiling), ""]
    return "\n".join(out)


def _latency_detail(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["extra"].get("group") in ("latency", "store", "ceiling") and r["latency_ms"]:
            lat = r["latency_ms"]
            achieved = r["deliveries_per_s"]
            rows.append([_label(r), r["scenario"], f"{achieved:,.0f}"] +
                        [f"{lat[k]:.3f}" for k in ("50", "90", "99", "99.9", "max")])
    return _table(["target", "scenario", "delivered/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                   "max ms"], rows)


def _connect_rates(results: list[dict]) -> str:
    rows = [[r["target"], r["scenario"], f"{r['extra']['connects_per_s']:,.0f}",
             f"{r['extra']['bytes_per_connection']:,.0f}"]
            for r in results if r["extra"].get("group") == "connections"]
    return _table(["target", "scenario", "connects/s", "bytes/connection"], rows)


def _store_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["extra"].get("group") != "store":
            continue
        lat = r["latency_ms"]
        rows.append([r["extra"]["relay_flags"], r["scenario"], f"{r['deliveries_per_s']:,.0f}",
                     f"{lat['50']:.3f}" if lat else "–", f"{lat['99']:.3f}" if lat else "–"])
    return _table(["flags", "scenario", "deliveries/s", "p50 ms", "p99 ms"], rows)


def _keyed_pair(runs: list[dict], value, pick) -> tuple[float | None, float | None]:
    """The best ``value`` of the unkeyed runs and of the keyed runs among ``runs``."""
    return tuple(pick((value(r) for r in runs if bool(r["params"].get("keyed")) == keyed
                       and value(r)), default=None) for keyed in (False, True))


def _over(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def _cpu(r: dict) -> float | None:
    return r["extra"].get("server_cpu_us_per_publish")


def keys_table(results: list[dict]) -> str:
    """Keyed beside unkeyed publishing per deployment and window: the cost of a key.

    With several runs of each, the best of each counts: the machine's other
    load only ever makes a run slower.  The relay's CPU time per publish
    (summed over a supervisor and its workers) is the steadier measure of
    what a key costs on a shared machine.
    Keys counted up and random keys (``random_keys``) are rows of their
    own beside the same unkeyed runs.  The last column is the spread: the
    CPU ratio of each round (a keyed run over the unkeyed run just before
    it), lowest to highest.
    """
    rows = []
    runs = [r for r in results if r["extra"].get("group") == "keys"]
    for deployment, flags in dict.fromkeys((r["extra"].get("deployment", ""),
                                            r["extra"]["relay_flags"]) for r in runs):
        mine = [r for r in runs if r["extra"].get("deployment", "") == deployment
                and r["extra"]["relay_flags"] == flags]
        window = flags.split("--dedupe-window")[-1].strip()
        for order in dict.fromkeys(_key_order(r) for r in mine if r["params"].get("keyed")):
            pairs = [r for r in mine if not r["params"].get("keyed") or _key_order(r) == order]
            plain_v, keyed_v = _keyed_pair(pairs, lambda r: r["publishes_per_s"], max)
            plain_c, keyed_c = _keyed_pair(pairs, _cpu, min)
            rounds = sorted(k / p for p, k in zip(
                [_cpu(r) for r in pairs if not r["params"].get("keyed")],
                [_cpu(r) for r in pairs if r["params"].get("keyed")]) if p and k)
            rows.append([deployment or "–", _store_of_flags(flags), window, order, _cell(plain_v),
                         _cell(keyed_v),
                         _over(keyed_v, plain_v), f"{plain_c:.2f}" if plain_c else "–",
                         f"{keyed_c:.2f}" if keyed_c else "–", _over(keyed_c, plain_c),
                         f"{rounds[0]:.2f}–{rounds[-1]:.2f}" if rounds else "–"])
    return _table(["deployment", "store", "--dedupe-window", "keys", "unkeyed publishes/s",
                   "keyed publishes/s", "keyed ÷ unkeyed", "relay µs CPU/publish, unkeyed",
                   "keyed", "keyed ÷ unkeyed (CPU)", "(CPU) each round"], rows)


def _store_of_flags(flags: str) -> str:
    """The store a relay started with ``flags`` (as ``fenghuo serve`` reads them) keeps."""
    words = flags.split()

    def flag(name: str, default: str) -> str:
        return words[words.index(name) + 1] if name in words[:-1] else default
    if flag("--store", "sqlite") == "memory":
        return "memory"
    return f"sqlite, --fsync {flag('--fsync', 'always')}"


def _key_order(r: dict) -> str:
    return "random" if r["params"].get("random_keys") else "counted"


def deployments_table(results: list[dict]) -> str:
    """fenghuo as one worker and as the default deployment, keyed beside unkeyed."""
    rows = []
    runs = [r for r in results if r["extra"].get("group") == "deployments"]
    for deployment, scenario in dict.fromkeys(
            (r["extra"]["deployment"], r["scenario"].removesuffix(" keyed")) for r in runs):
        mine = [r for r in runs if r["extra"]["deployment"] == deployment
                and r["scenario"].removesuffix(" keyed") == scenario]
        plain_v, keyed_v = _keyed_pair(mine, lambda r: r["deliveries_per_s"], max)
        plain_c, keyed_c = _keyed_pair(mine, _cpu, min)
        rows.append([deployment, f"{mine[0]['params'].get('workers', 1)}", scenario,
                     _cell(plain_v), _cell(keyed_v), _over(keyed_v, plain_v),
                     f"{plain_c:.2f}" if plain_c else "–", f"{keyed_c:.2f}" if keyed_c else "–"])
    return _table(["deployment", "workers", "scenario", "unkeyed deliveries/s",
                   "keyed deliveries/s", "keyed ÷ unkeyed", "relay µs CPU/publish, unkeyed",
                   "keyed"], rows)


def _generator(results: list[dict], ceiling: float) -> str:
    rows = [[_label(r), r["scenario"], f"{_si(r['generator_bytes_per_s'])}B/s",
             f"{100 * r['generator_bytes_per_s'] / ceiling:.0f} %" if ceiling else "–"]
            for r in results if r["generator_bytes_per_s"]]
    return _table(["target", "scenario", "generator traffic", "of ceiling"], rows)


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """latency_cdf.png, fan_out.png, memory.png from a results document."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    drawn = []
    latency = [r for r in results if r["extra"].get("group") in ("latency", "ceiling")
               and r["extra"].get("cdf")]
    if latency:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in latency:
            points = r["extra"]["cdf"]
            ms = [p[0] for p in points]
            nines = [1 / max(1 - p[1], 1e-5) for p in points]
            ax.plot(nines, ms, label=f"{_label(r)} {r['scenario']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 10, 100, 1000, 10000], ["0", "50", "90", "99", "99.9", "99.99"])
        ax.set_xlabel("percentile")
        ax.set_ylabel("publish-to-deliver latency (ms)")
        ax.set_title("Latency at fixed offered rates")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        drawn.append(_save(fig, out / "latency_cdf.png"))
    fan = [r for r in results if r["extra"].get("group") == "fan-out"]
    if fan:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for target in dict.fromkeys(r["target"] for r in fan):
            rows = sorted((r["params"]["members"], r["deliveries_per_s"]) for r in fan
                          if r["target"] == target)
            ax.plot([m for m, _ in rows], [d for _, d in rows], marker="o", label=target)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("group members (one connection each)")
        ax.set_ylabel("deliveries/s")
        ax.set_title("Throughput against fan-out size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        drawn.append(_save(fig, out / "fan_out.png"))
    conns = [r for r in results if r["extra"].get("group") == "connections"]
    if conns:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in conns:
            curve = r["extra"]["rss_curve"]
            ax.plot([n for n, _ in curve], [rss / 2**20 for _, rss in curve], marker="o",
                    label=r["target"])
        ax.set_xlabel("idle authenticated connections")
        ax.set_ylabel("server RSS (MiB)")
        ax.set_title("Server memory against connections")
        ax.grid(True, alpha=0.3)
        ax.legend()
        drawn.append(_save(fig, out / "memory.png"))
    return drawn


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write(out: Path, results: list[Result], *, quick: bool, command: str) -> str:
    """Write every file of a suite run into ``out``; return the markdown."""
    ceiling = max((r.generator_bytes_per_s for r in results if r.target == "echo"), default=0.0)
    doc = {"date": dt.date.today().isoformat(), "quick": quick, "machine": machine(),
           "command": command,
           "generator_ceiling_bytes_per_s": ceiling,
           "results": [r.to_json() for r in results]}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    return _render(doc, out)


def redraw(out: Path) -> str:
    """Redraw the table and plots of an existing results folder."""
    return _render(json.loads((out / "results.json").read_text()), out)


def _render(doc: dict[str, Any], out: Path) -> str:
    text = markdown(doc)
    drawn = plots(doc, out)
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in drawn) + "\n"
    (out / "results.md").write_text(text)
    return text


if __name__ == "__main__":
    print(redraw(Path(sys.argv[1])))
