"""The bench commands run end to end at tiny sizes.

What they measure is not judged here; that they measure it is: every
message offered is delivered and counted, latency samples come from the
stamps, the files a reader is pointed to exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


TINY = ["--duration", "0.5", "--warmup", "0.2"]


@pytest.mark.parametrize("target", ["fenghuo", "asyncio", "echo"])
@pytest.mark.parametrize("scenario, extra", [
    ("one-to-one", []),
    ("many-to-many", ["--pairs", "20"]),
])
def test_throughput_scenarios_deliver_what_they_publish(target, scenario, extra, tmp_path):
    out = tmp_path / "result.json"
    run = bench("run", scenario, "--target", target, *extra, *TINY, "--json", str(out))
    result = json.loads(out.read_text())
    assert result["target"] == target and result["scenario"] == scenario
    assert result["deliveries_per_s"] > 0 and result["generator_bytes_per_s"] > 0
    # Each pair has one subscriber: deliveries keep up with publishes
    # (the windows still in flight at the end are all that may differ).
    assert result["deliveries_per_s"] <= result["publishes_per_s"] * 1.05
    assert re.search(rf"{target} {scenario}: [\d,]+ deliveries/s", run.stdout)


def test_keys_compares_keyed_and_unkeyed_publishing_per_window():
    run = bench("keys", "--windows", "16", "--repeat", "1", "--keys", "counted,random", *TINY)
    # Every keyed publish had a key of its own, counted up or scattered: none
    # was answered DUPLICATE, so the keyed runs delivered what they published.
    lines = re.findall(r"one-to-one(?: keyed(?: random)?)?: ([\d,]+) deliveries/s, ([\d,]+) publishes/s",
                       run.stdout)
    assert len(lines) == 6, run.stdout          # both deployments: unkeyed, two key orders
    for delivered, published in lines:
        assert 0 < int(delivered.replace(",", "")) <= 1.05 * int(published.replace(",", ""))
    # Per deployment (with the store it ran on) and key order: unkeyed, keyed, their
    # ratio; the relay's CPU per publish follows.
    for deployment, store in (("1 worker, memory", "memory"), ("default", "sqlite, --fsync always")):
        for order in ("counted", "random"):
            row = re.search(rf"^\| {deployment} \| {store} \| 16 \| {order} \| ([\d.]+ [kM]?) ?"
                            rf"\| ([\d.]+ [kM]?) ?\| ([\d.]+) \|", run.stdout, re.M)
            assert row, run.stdout


@pytest.mark.parametrize("target", ["fenghuo", "asyncio"])
def test_fan_out_delivers_to_every_member(target, tmp_path):
    out = tmp_path / "result.json"
    bench("run", "fan-out", "--target", target, "--members", "20", *TINY, "--json", str(out))
    result = json.loads(out.read_text())
    # Twenty deliveries per publish, within the windows in flight at the edges.
    assert 15 * result["publishes_per_s"] < result["deliveries_per_s"] < 25 * result["publishes_per_s"]


@pytest.mark.parametrize("target", ["fenghuo", "echo"])
def test_latency_run_offers_the_rate_and_samples_every_delivery(target, tmp_path):
    out = tmp_path / "result.json"
    bench("run", "latency", "--target", target, "--pairs", "4", "--rate", "2000",
          "--duration", "1", "--warmup", "0.3", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["offered_per_s"] == 2000
    # Over one second at 2,000/s about 2,000 samples, one per delivery.
    assert 1500 < result["latency_samples"] < 2500
    assert abs(result["deliveries_per_s"] - 2000) < 300
    lat = result["latency_ms"]
    assert 0 < lat["50"] <= lat["90"] <= lat["99"] <= lat["99.9"] <= lat["max"]


def test_connections_reports_memory_and_rate(tmp_path):
    out = tmp_path / "result.json"
    run = bench("run", "connections", "--connections", "100", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["extra"]["connects_per_s"] > 0
    curve = result["extra"]["rss_curve"]
    assert curve[0][0] == 0 and curve[-1][0] == 100
    assert "bytes_per_connection=" in run.stdout


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
@pytest.mark.timeout(300)    # valgrind's start and the two dumps: 2 minutes at load average 8
def test_connect_cost_counts_the_relays_instructions_per_connect():
    run = bench("connect-cost", "--connections", "20", "--warmup", "5", timeout=300)
    first, *objects, closes = run.stdout.strip().splitlines()
    per_connect = int(re.search(r"HELLO \(20 connects after 5\): ([\d,]+)$", first)[1].replace(",", ""))
    assert per_connect > 10_000, run.stdout     # a connect + HELLO runs the interpreter
    assert any("libpython" in line or "python" in line for line in objects), run.stdout
    # The closes counted apart, once the relay has closed every connection.
    per_close = int(re.search(r"per close, counted apart: ([\d,]+)$", closes)[1].replace(",", ""))
    assert per_close > 1_000, run.stdout


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_connect_cost_cpu_times_the_relay_redis_and_the_uvloop_floor_in_each_round():
    run = bench("connect-cost", "--cpu", "--connections", "50", "--warmup", "5", "--rounds", "2",
                "--peers", "redis,uvloop-floor")
    lines = run.stdout.strip().splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    floors = [line for line in lines if line.startswith("  uvloop floor ")]
    assert len(rounds) == 2 and len(floors) == 2 and len(lines) == 4, run.stdout
    for line in rounds:
        assert re.search(r"fenghuo [\d.]+ us, redis-server [\d.]+ us: .* ([\d.]+x|n/a) redis", line), line
        assert re.search(r"user/system fenghuo [\d.]+/[\d.]+ us, redis-server [\d.]+/[\d.]+ us$", line), line
    for line in floors:
        assert re.search(r"user/system [\d.]+/[\d.]+ us: fenghuo's user time ([\d.]+x|n/a) the "
                         r"floor's, [+-][\d.]+ us above it$", line), line


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
@pytest.mark.timeout(300)
def test_connect_cost_counts_the_uvloop_floors_instructions_beside_the_relays():
    run = bench("connect-cost", "--connections", "20", "--warmup", "5", "--peers", "uvloop-floor",
                timeout=300)
    relay = int(re.search(r"HELLO \(20 connects after 5\): ([\d,]+)$", run.stdout, re.M)[1].replace(",", ""))
    floor = re.search(r"^uvloop floor instructions per connect \(20\): ([\d,]+); the relay's "
                      r"([\d.]+)x, ([+-][\d,]+) above it$", run.stdout, re.M)
    assert floor is not None, run.stdout
    # A connect that reads once and writes one line runs the interpreter too
    # (the protocol's methods), far less than a HELLO's.
    assert 1_000 < int(floor[1].replace(",", "")) < relay, run.stdout


def _perf_traces_syscalls() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_accept4", "true"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and "not supported" not in probe.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None or not _perf_traces_syscalls(),
                    reason="needs redis-server and perf with syscall tracepoints")
def test_connect_cost_counts_each_servers_system_calls_per_connect():
    run = bench("connect-cost", "--cpu", "--syscalls", "--connections", "50", "--warmup", "5",
                "--rounds", "1")
    _, ours, theirs = run.stdout.strip().splitlines()
    for line, server in ((ours, "fenghuo"), (theirs, "redis-server")):
        found = re.search(rf"system calls per connect: {server} ([\d.]+) \((.*)\)$", line)
        assert found, run.stdout
        by_name = dict(pair.rsplit(" ", 1) for pair in found[2].split(", "))
        # Each connect is accepted and answered (redis-server also opens and
        # closes files of its own now and then).
        assert float(by_name["accept4"]) >= 1.0 and float(by_name["write"]) >= 1.0, line
        assert float(found[1]) >= 4.0, line


def test_fenghuo_run_also_reports_the_relays_own_histogram(tmp_path):
    run = bench("run", "one-to-one", *TINY, "--relay", "--store memory")
    assert re.search(r"relay publish-to-deliver \(server histogram.*\): p50 <= [\d.]+ ms", run.stdout)


@pytest.mark.timeout(600)    # the bench's own bound; the default 120 s was hit at load average 7
def test_quick_suite_writes_json_table_and_plots(tmp_path):
    """The CI smoke of the whole suite: every target, every scenario, tiny sizes."""
    out = tmp_path / "suite"
    run = bench("suite", "--quick", "--out", str(out), timeout=600)
    doc = json.loads((out / "results.json").read_text())
    assert doc["quick"] and doc["machine"]["cores"] >= 1
    assert doc["generator_ceiling_bytes_per_s"] > 0
    targets = {r["target"] for r in doc["results"]}
    assert targets == {"echo", "fenghuo", "fenghuo-tls", "fenghuo-ws", "asyncio", "nats", "redis"}
    groups = {r["extra"]["group"] for r in doc["results"]}
    assert groups == {"ceiling", "throughput", "fan-out", "latency", "connections", "store", "keys",
                      "deployments"}
    for r in doc["results"]:
        if r["extra"]["group"] in ("throughput", "fan-out"):
            assert r["deliveries_per_s"] > 0, r
        if r["extra"]["group"] == "latency":
            assert r["latency_samples"] > 0 and r["extra"]["cdf"], r
    table = (out / "results.md").read_text()
    assert "× nats" in table and "× redis" in table and "× asyncio" in table
    assert "× fenghuo-tls" in table and "× fenghuo-ws" in table
    assert "keyed ÷ unkeyed" in table
    # fenghuo as one worker and as the default deployment, keyed beside unkeyed.
    for deployment in ("1 worker, memory", "default"):
        for scenario in ("one-to-one", "many-to-many 10"):
            assert re.search(rf"^\| {deployment} \| \d+ \| {scenario} \| [\d.]+ [kM]? ?\| [\d.]+ [kM]? ?\|",
                             table, re.M), table
    for png in ("latency_cdf.png", "fan_out.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "results in" in run.stdout


def test_suite_groups_runs_only_those_groups_every_target_side_by_side(tmp_path):
    """``--groups connections``: the connect and memory scenario of each target, nothing else."""
    out = tmp_path / "suite"
    bench("suite", "--quick", "--targets", "fenghuo,nats,redis", "--groups", "connections",
          "--out", str(out))
    doc = json.loads((out / "results.json").read_text())
    assert [(r["target"], r["extra"]["group"]) for r in doc["results"]] == [
        ("fenghuo", "connections"), ("nats", "connections"), ("redis", "connections")]
    assert all(r["extra"]["connects_per_s"] > 0 for r in doc["results"])
    assert "--groups connections" in doc["command"]


def test_suite_refuses_an_unknown_group(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench", "suite", "--quick", "--groups", "conections",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode != 0 and "unknown --groups conections" in run.stderr


def test_devices_closes_one_users_connections_and_as_many_users(tmp_path):
    run = bench("devices", "--connections", "200", "--processes", "2")
    figures = {m.group(1): json.loads(m.group(2))
               for m in re.finditer(r"^\s*(one user|distinct users): (\{.*\})$", run.stdout, re.M)}
    assert set(figures) == {"one user", "distinct users"}
    for result in figures.values():
        assert result["connections"] == 200 and result["close_cpu_s"] >= 0
    assert re.search(r"closing 200 connections of one user costs [\d.]+x", run.stdout)


def test_storm_admits_everyone_and_counts_refusals(tmp_path):
    run = bench("storm", "--clients", "300", "--processes", "2", "--relay", "--max-handshakes 20")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["admitted"] == 300 and result["other"] == []
    assert result["refusals"] > 0 and result["retry_after_ms"]["max"] >= 100


@pytest.mark.parametrize("workers", ["1", "2"])
def test_hostile_answers_everything_in_order_and_the_canary_loses_nothing(workers):
    run = bench("hostile", "--workers", workers, "--seconds", "2", "--connections", "2")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["answered"] == result["sent"] > 0 and result["unanswered"] == 0
    assert (result["wedged"], result["out_of_order"], result["canary_lost"]) == (0, 0, 0)
    assert result["canary"]["acked"] > 0


def test_api_bench_measures_both_paths_in_one_run():
    out = bench("api", "--count", "20", "--concurrency", "4").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:3]}
    assert set(rows) == {"protocol", "api"} and all(float(v[0]) > 0 for v in rows.values()), out
    assert "api/protocol: throughput x" in out
def test_schedule_bench_fires_every_message_with_and_without_pending_timers():
    out = bench("schedule", "--pending", "500", "--fired", "20").stdout
    result = json.loads(out.splitlines()[-1])
    for pending in ("0", "500"):
        lateness = result[pending]["sequenced_ms"]
        # Never before its time (the relay's clock sequenced it at or after send_at).
        assert 0 <= lateness["min"] <= lateness["p50"] <= lateness["max"], out
        # What held the relay meanwhile: its CPU wait and its loop's lag, sampled
        # every 10 ms by the relay through the 3 s before the first fire.
        window = result[pending]["window"]
        assert window["runqueue_wait_ms"] >= 0 and window["lag_count"] >= 100, window
        assert all(span["count"] >= 1 for span in result[pending]["late_spans"]), out
    assert result["bytes_per_pending_timer"] > 0 and "500 pending / 0 pending" in out
    assert out.count("during the fires") == 2, out


def test_tls_runs_every_scenario_over_tcp_and_tls_with_ratios():
    run = bench("tls", "--members", "10", "--connections", "50", "--pairs", "2", "--rate", "200",
                "--warmup", "0.2", "--duration", "0.5", "--repeat", "1")
    out = run.stdout
    assert out.count("fenghuo-tls ") == 4 and "fenghuo connections 50" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "scenario" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| one-to-one", "| fan-out 10", "| latency 2 pairs @ 200/s", "| 50 connections"]
    for row in rows:    # both transports delivered: every TLS / TCP ratio is above 0
        assert float(row.split(" | ")[4]) > 0


def _rows(out: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``."""
    lines = out[out.index(header):].splitlines()
    table = lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]


def test_ws_runs_every_scenario_over_tcp_and_websocket_and_both_clients():
    run = bench("ws", "--members", "10", "--connections", "50", "--pairs", "2", "--rate", "200",
                "--warmup", "0.2", "--duration", "0.5", "--repeat", "1",
                "--messages", "300", "--window", "8")
    out = run.stdout
    assert out.count("fenghuo-ws ") == 4 and "fenghuo connections 50" in out
    rows = _rows(out, "| scenario | metric | TCP | WS | WS / TCP |")
    assert [r[0] for r in rows] == ["one-to-one", "fan-out 10", "latency 2 pairs @ 200/s",
                                    "50 connections"]
    for row in rows:    # both transports delivered: every WS / TCP ratio is above 0
        assert len(row) == 13 and float(row[4]) > 0
    latency = rows[2]   # percentiles from the stamps on both transports
    assert all(float(cell) > 0 for cell in latency[5:9])
    for row in rows[:2]:    # the relay's CPU per publish on both, for the throughput runs
        assert float(row[10]) > 0 and float(row[11]) > 0 and float(row[12]) > 0
    clients = _rows(out, "| client | transport |")
    assert [r[:2] for r in clients] == [["Python (fenghuo.Client)", "TCP"],
                                        ["JavaScript (node, fenghuo.js)", "WebSocket"]]
    assert float(clients[0][2].replace(",", "")) > 0
    if shutil.which("node"):
        assert float(clients[1][3]) > 0


def test_tail_runs_every_target_at_every_rate_with_the_relays_stalls(tmp_path):
    out = tmp_path / "tail.json"
    targets = ("fenghuo-1", "fenghuo", "fenghuo-1-durable", "nats")
    run = bench("tail", "--rates", "200,400", "--rounds", "1", "--warmup", "0.2", "--duration", "0.5",
                "--targets", ",".join(targets), "--json", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [(r["target"], r["rate"]) for r in runs] == [
        (t, rate) for rate in (200, 400) for t in targets]
    for r in runs:
        assert r["deliveries_per_s"] > 0 and set(r["latency_ms"]) >= {"50", "99", "99.9"}
        assert r["relay"]["cpu_wait_ms_per_s"] >= 0 and r["loadavg"] >= 0, r   # every server's
        if r["target"].startswith("fenghuo"):   # the relay's own lag samples, every worker's
            assert r["relay"]["lag_count"] > 0 and r["relay"]["own_count"] == r["relay"]["lag_count"], r
            assert r["relay"]["own_over_2ms"] <= r["relay"]["lag_over_2ms"] and "gc_count" in r["relay"], r
        if r["target"] == "fenghuo-1-durable":     # the store's timings of its batches
            # One count per batch each; a batch taken before a scrape and written
            # after it (at the run's start or end) is in one delta, not the other.
            waits, writes = r["relay"]["store_wait_count"], r["relay"]["store_write_count"]
            assert waits > 0 and abs(waits - writes) <= 1, r
            assert r["relay"]["store_handback_count"] > 0 and r["relay"]["writer_cpu_ms_per_s"] > 0, r
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "target" not in line]
    assert [row.split(" | ")[1] for row in rows] == list(targets) * 2
    assert all(row.split(" | ")[5] == "1.00" for row in rows if " nats " in row)   # nats ÷ nats


def test_tail_shares_the_rate_over_pairs(tmp_path):
    out = tmp_path / "tail.json"
    bench("tail", "--rates", "400", "--pairs", "4", "--rounds", "1", "--warmup", "0.2", "--duration", "0.5",
          "--targets", "fenghuo-1-durable", "--json", str(out))
    (run,) = json.loads(out.read_text())["runs"]
    assert run["pairs"] == 4 and run["deliveries_per_s"] > 0 and run["latency_ms"]["99"] > 0, run


def test_webhooks_bench_compares_publishing_with_and_without_and_drains_the_outbox():
    out = bench("webhooks", "--count", "50", "--channels", "4", "--concurrency", "4", "--repeat", "1").stdout
    rows = {line[:18].strip(): line[18:].split() for line in out.splitlines()[1:4]}
    assert set(rows) == {"without webhooks", "with webhooks", "outbox writes only"}, out
    assert all(float(v[0]) > 0 for v in rows.values()), out
    assert "with webhooks/without: throughput x" in out
    assert "outbox writes only/without: throughput x" in out
    drained = re.search(r"outbox drain: (\d+) events in [\d.]+ s = (\d+) events/s", out)
    assert drained and int(drained.group(1)) >= 50 and int(drained.group(2)) > 0, out


def test_commits_measures_the_writer_with_and_without_each_index_given():
    # Each --without is a setting of its own, after the one with every index;
    # a commit without the per-channel index writes fewer WAL pages.
    out = bench("commits", "--commits", "20", "--rounds", "1", "--wal-frames", "65536",
                "--without", "messages_by_seq", "--without", "commit_spans_by_min,messages_by_seq").stdout
    pages = {m[1] or "": int(m[2]) for m in re.finditer(
        r"wal_autocheckpoint=65536(?: without (\S+))?: writer CPU [\d.]+ us/msg, (\d+) WAL pages", out)}
    assert set(pages) == {"", "messages_by_seq", "commit_spans_by_min,messages_by_seq"}, out
    assert pages["commit_spans_by_min,messages_by_seq"] <= pages["messages_by_seq"] < pages[""]
    # Each beside the store's checkpointer too (the default compares both places).
    assert len(re.findall(r"checkpointer=65536(?: without \S+)?: writer CPU [\d.]+ us/msg"
                          r" \+ checkpointer [\d.]+ us/msg, \d+ WAL pages", out)) == 3, out
    assert "fdatasync floor (append 4 KiB)" in out


def test_commits_compares_writers_taking_turns_at_one_file_and_a_file_each(tmp_path: Path) -> None:
    # Two writers (as the default deployment's two workers) commit in turn: at one
    # file both write its WAL; with a file each, the second writer's WAL is its own.
    out = bench("commits", "--commits", "16", "--rounds", "1", "--wal-frames", "65536", "--checkpoint",
                "beside", "--writers", "1,2", "--files", "shared,own", "--dir", str(tmp_path)).stdout
    assert not list(tmp_path.iterdir()), "every store is removed after its setting"
    pages = {m[1] or "": int(m[2]) for m in re.finditer(
        r"round 1 schema5 page 4096 checkpointer=65536(?: 2 writers \((one file|a file each)\))?: writer CPU"
        r" [\d.]+ us/msg \+ checkpointer [\d.]+ us/msg, (\d+) WAL pages", out)}
    assert set(pages) == {"", "one file", "a file each"}, out
    assert all(n > 0 for n in pages.values()), out


def test_commits_compares_layouts_and_page_sizes():
    # The channel index filed after the commits: fewer pages a commit, and the
    # filing's own CPU printed beside; a page of 8 KiB: fewer, larger pages.
    out = bench("commits", "--commits", "16", "--rounds", "1", "--wal-frames", "65536", "--checkpoint", "inside",
                "--layout", "schema5,deferred,deferred-attached,packed", "--page-size", "4096,8192").stdout
    pages = {(m[1], int(m[2])): int(m[3]) for m in re.finditer(
        r"round 1 (\S+) page (\d+) wal_autocheckpoint=65536: writer CPU [\d.]+ us/msg"
        r"(?: \+ filing [^,]+)?, (\d+) WAL pages", out)}
    assert set(pages) == {(layout, size) for layout in ("schema5", "deferred", "deferred-attached", "packed")
                          for size in (4096, 8192)}, out
    assert pages["deferred", 4096] < pages["schema5", 4096]
    assert pages["deferred-attached", 4096] < pages["schema5", 4096]
    assert pages["schema5", 8192] < pages["schema5", 4096]
    assert out.count("+ filing") == 4


def test_commits_measures_the_channel_index_built_off_the_ack_path():
    # The log layouts append rows at each commit and build the channel index every
    # --index-every messages: fewer WAL pages a commit than schema 5, each build
    # counted in the writer's total, and every setting prints its total, its WAL
    # bytes a message and its acks' p99.
    out = bench("commits", "--channels", "50", "--batch", "200", "--commits", "12", "--rounds", "1",
                "--wal-frames", "65536", "--checkpoint", "beside", "--layout", "schema5,log,log-move",
                "--index-every", "800,2400").stdout
    rows = {m[1]: m for m in re.finditer(
        r"round 1 (\S+) page 4096 checkpointer=65536: writer CPU ([\d.]+) us/msg"
        r"(?: \+ index build ([\d.]+) us/msg \((\d+) builds, p50 [\d.]+ max [\d.]+ ms\))?"
        r" \+ checkpointer [\d.]+ us/msg, (\d+) WAL pages a commit \(while it grows\), commit p50 [\d.]+"
        r" p99 [\d.]+ max [\d.]+ ms; writer total ([\d.]+) us/msg, WAL (\d+) B/msg \(([\d.]+) pages\),"
        r" ack p99 ([\d.]+) ms", out)}
    assert set(rows) == {"schema5", "log/800", "log/2400", "log-move/800", "log-move/2400"}, out
    # 2,400 messages: a build every 800 (3) or one at 2,400
    assert [int(rows[f"{layout}/{every}"][4]) for layout in ("log", "log-move") for every in (800, 2400)] \
        == [3, 1, 3, 1], out
    assert rows["schema5"][3] is None
    for label, m in rows.items():
        built = float(m[3] or 0)
        assert float(m[6]) == pytest.approx(float(m[2]) + built, abs=0.02), (label, out)
        assert int(m[7]) > 0 and float(m[9]) > 0, (label, out)
    assert int(rows["log/800"][5]) < int(rows["schema5"][5]), out
