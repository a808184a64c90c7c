"""``python -m bench cluster`` end to end at tiny sizes (tests/test_bench_smoke.py's pattern).

What it measures is not judged here; that it measures it is: every
scenario ran on every target of the run, every message offered was
delivered and counted, latency samples are real stamps.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from bench.peers import ensure_installed
from test_bench_smoke import bench


@pytest.fixture(scope="module", autouse=True)
def nats_server_installed():
    ensure_installed()


@pytest.mark.timeout(420)    # the bench's own bound; the default 120 s was hit at load average 14 (136 s)
def test_paths_run_every_scenario_on_one_node_the_cluster_and_nats(tmp_path):
    out = tmp_path / "cluster.json"
    run = bench("cluster", "--quick", "--parts", "paths",
                "--targets", "single,cluster-same,cluster-cross,nats", "--json", str(out),
                timeout=400)
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python -m bench cluster --quick")
    rows = doc["paths"]
    assert [r["scenario"].split(",")[0].split(" @")[0] for r in rows] == [
        "one-to-one", "one-to-one latency", "fan-out 5", "fan-out 5 latency"]
    for row in rows:
        assert list(row["results"]) == ["single", "cluster-same", "cluster-cross", "nats"]
        for target, r in row["results"].items():
            members = r["params"].get("members", 1)
            assert r["publishes_per_s"] > 0, (row["scenario"], target)
            # Every publish reached every receiver: deliveries keep up with
            # publishes (windows in flight at the interval's edges aside).
            assert 0.8 * members * r["publishes_per_s"] <= r["deliveries_per_s"] \
                <= 1.05 * members * r["publishes_per_s"] + 50, (row["scenario"], target, r)
            if r["offered_per_s"]:
                # Each delivery gave a latency sample from its stamp (a link
                # whose frames were misaligned would read garbage: hours).
                expected = r["offered_per_s"] * members * r["seconds"]
                assert 0.8 * expected <= r["latency_samples"] <= 1.2 * expected + 50, r
                assert r["latency_ms"]["max"] < r["seconds"] * 1000 + 60_000, r
    # One line per scenario in the ratio table, the cluster's ratios in it.
    assert "| scenario | single | cluster-same | cluster-cross | nats |" in run.stdout
    assert run.stdout.count("\n| one-to-one") == 2 and run.stdout.count("\n| fan-out 5") == 2


def test_failover_counts_every_acked_message_across_an_owner_s_kill(tmp_path):
    """kill -9 of the node sequencing the busy group: the bench counts what was
    acked, stored and received (it exits 1 if any acked message was lost or
    duplicated, which ``bench`` fails on)."""
    out = tmp_path / "failover.json"
    bench("cluster", "--parts", "failover", "--failover-victims", "node",
          "--failover-rate", "40", "--failover-before", "1", "--failover-after", "2",
          "--json", str(out), timeout=300)
    (event,) = json.loads(out.read_text())["failover"]
    assert event["victim"] == "node"
    assert event["acked"] == event["published"] > 0
    assert event["stored"] >= event["acked"]           # the group's own events aside
    assert event["lost_acked_not_stored"] == event["stored_twice"] == 0
    assert event["stored_seqs_gap_free"]
    assert len(event["receivers"]) == 3
    for receiver in event["receivers"].values():
        assert receiver == {"acked_not_received": 0, "duplicates": 0, "in_seq_order": True}
    assert event["sequenced_again_after_s"] is not None
    # This process's own stalls, which every time above would include.
    assert event["bench_loop_lag_ms"]["max"] is not None


@pytest.mark.timeout(300)
def test_failover_of_the_stream_leader_s_server_times_jetstream_s_election_apart_from_fenghuo_s_part(
        tmp_path):
    """kill -9 of the nats-server leading the stream: besides what was acked,
    stored and received, the bench notes when JetStream's advisory of the new
    leader came, and how long after it the channel was sequenced again (the
    part of the wait that is fenghuo's, not the election's)."""
    out = tmp_path / "failover.json"
    bench("cluster", "--parts", "failover", "--failover-victims", "nats",
          "--failover-rate", "40", "--failover-before", "1", "--failover-after", "2",
          "--json", str(out), timeout=280)
    (event,) = json.loads(out.read_text())["failover"]
    assert event["victim"].startswith("nats (")
    assert event["acked"] == event["published"] > 0
    assert event["lost_acked_not_stored"] == event["stored_twice"] == 0
    assert event["stored_seqs_gap_free"]
    elected, again = event["stream_leader_elected_after_s"], event["sequenced_again_after_s"]
    assert elected is not None and elected > 0
    assert again is not None
    assert event["sequenced_again_after_election_s"] == pytest.approx(again - elected, abs=0.002)


@pytest.mark.timeout(300)
def test_asks_count_the_burst_of_asks_after_a_lost_heads_record_and_an_owner_s_restart(tmp_path):
    """Five channels n0 feeds n1: a heads record dropped, then n0 restarted; each
    time n1 asks n0 again for every one (in one ``interest`` record, counted on
    its link), after the lost record each is answered, and the probe on n1 ran,
    each of its publishes counted once: delivered, late, acked and never
    delivered, refused or unanswered."""
    out = tmp_path / "asks.json"
    run = bench("cluster", "--parts", "asks", "--asks-channels", "5", "--asks-probe-rate", "20",
                "--json", str(out), timeout=280)
    rows = json.loads(out.read_text())["asks"]
    assert [r["trigger"] for r in rows] == ["heads", "restart"]
    for r in rows:
        assert r["channels"] == 5 and r["asks"] >= 1 and r["ask_bytes"] > 0, r
        assert r["channels_asked"] == 5, r
        assert r["record_bytes"] > 0 and r["cpu_owner_s"] > 0, r
        assert r["probe_before_ms"]["n"] > 0, r
        # Every probe publish of each window in exactly one outcome.
        windows = ("probe_before", "probe_to_first_ask", "probe_during", "probe_after")
        for window in windows:
            a = r[window]
            assert a["sent"] == sum(a[k] for k in (
                "delivered", "late", "acked_not_delivered", "refused", "unanswered")), (window, a)
            assert a["refused"] == sum(a["refused_codes"].values()), (window, a)
            assert a["delivered"] == a["delivered_ms"]["n"] and a["late"] == a["late_ms"]["n"]
        assert r["probe_before"]["sent"] > 0 and r["probe_before"]["delivered"] > 0, r
        timeline = r["probe_timeline"]
        assert len(timeline) == sum(r[w]["sent"] for w in windows) > 0
        assert all(sent is not None for sent, _, _, _ in timeline)
        assert r["asks_after_window"] >= 0 and r["burst_end_after_s"] >= 0, r
    heads, restart = rows
    assert heads["dropped"] > 0 and heads["heads_missed"] >= 1, heads
    assert heads["channels_answered"] == 5 and heads["current_after_first_ask_s"] is not None
    assert restart["heads_missed"] == 0, restart    # its numbers from 1: the restart, no gap
    assert "| heads | 5 |" in run.stdout and "| restart | 5 |" in run.stdout
    assert "acked not delivered" in run.stdout


@pytest.mark.timeout(300)
def test_restart_times_each_build_s_restarts_in_turn_over_the_groups_made(tmp_path):
    """Five groups; n0 restarted twice by each of two builds (this checkout
    named twice), in turn: each restart timed to listening, with its CPU and
    load, and the buckets' entries counted."""
    out = tmp_path / "restart.json"
    here = str(Path(__file__).resolve().parent.parent)
    run = bench("cluster", "--parts", "restart", "--restart-groups", "5", "--restart-rounds", "2",
                "--restart-builds", f"{here},{here}/.", "--json", str(out), timeout=240)
    rows = json.loads(out.read_text())["restart"]
    assert [(r["round"], r["build"]) for r in rows] == [(0, here), (0, here), (1, here), (1, here)]
    for r in rows:
        assert r["groups"] == 5 and 0 < r["listening_s"] < 120 and r["cpu_s"] > 0, r
        assert r["entries"]["fenghuo_groups"] == 5 and r["entries"]["fenghuo_owners"] >= 5, r
    assert "| 5 |" in run.stdout and "PASS" in run.stdout


def test_regions_measure_every_pair_through_the_stretched_cluster(tmp_path):
    """Four regions, a node and a nats-server each, routes through delay proxies:
    every pair's messages and catch-up trials arrive and are counted."""
    out = tmp_path / "regions.json"
    run = bench("cluster", "--parts", "regions", "--regions-messages", "3",
                "--regions-rate", "2", "--regions-catchup", "1", "--regions-scale", "0.1",
                "--json", str(out), timeout=300)
    regions = json.loads(out.read_text())["regions"]
    assert len(regions["pairs"]) == 16
    assert regions["verdicts"]["delivery"]["ok"]
    for pair in regions["pairs"]:
        assert pair["sent"] == pair["delivered"] == 3 and pair["duplicates"] == 0
        assert pair["catchup"]["trials"] == 1
        # The cluster's path between the nodes is counted in the injected delay:
        # each hop at the delay its route proxy gave that message's chunk.
        assert pair["nominal_one_way_ms"]["between_nodes"] > 0
        assert pair["between_nodes_exact"] == 3
        assert pair["overhead_hops_at_mean_ms"]["p50"] is not None
        # The relay's own time (proxy to proxy, less what was injected between),
        # split at every route proxy on each message's path after the first.
        assert pair["relay_overhead_ms"]["p50"] is not None
        assert len(pair["relay_segments_after_first_ms"]) == 2
        assert all(message for message in pair["relay_segments_after_first_ms"])
        assert 0 <= pair["between_proxies_in_a_bench_stall"] <= 3
    for cpu in regions["machine"]["cpu"].values():
        assert cpu["ran_s_per_s"] > 0
    # Each node's event loop over the measurement, its own stalls apart.
    assert set(regions["machine"]["node_loops"]) == {"shanghai", "frankfurt", "virginia",
                                                      "sydney"}
    assert all(loop["lag_count"] > 0 for loop in regions["machine"]["node_loops"].values())
    # Placed by the nodes' --stream-tags and led from --stream-leader's server
    # (the bench's defaults), not wherever JetStream elected it.
    assert regions["stream_leader"] == "virginia"
    assert sorted(regions["stream_followers"]) == ["frankfurt", "sydney"]
    assert len(regions["owners"]) == 16
    # The figures are worked out once the nodes and nats-servers are stopped:
    # they hold this process's loop, which runs every route proxy.
    loop = regions["machine"]["bench_loop"]
    assert [m["what"] for m in loop["marks"]] == [
        "the messages start", "the nodes and nats-servers stop",
        "the figures are worked out (the cluster stopped)", "the figures are out"]
    assert loop["figures_s"] >= 0 and loop["stalls_while_up"] >= 0
    assert "verdict: end-to-end p99 < 600 ms in every pair" in run.stdout
    assert "verdict: relay overhead p99 < 10 ms in every pair (the relay's own" in run.stdout


async def test_each_stretched_nats_server_expects_all_four_meta_peers_from_its_start(tmp_path):
    """The regions bench's four nats-servers (routes through delay proxies) each
    bootstrap JetStream expecting four meta peers (a quorum of three), as a lone
    server's meta group says; then all four name one meta leader.  With only the
    other three routes listed a server expected three (a quorum of two of the
    four), and a start of the bench ended with two meta leaders at once and a node
    whose JetStream requests were never answered."""
    from bench import geo
    from bench.cluster_regions import Stretched

    cluster = Stretched(tmp_path, "secret", 0.1)
    try:
        binary = await cluster.prepare()
        first = cluster.servers[geo.REGIONS[0]]
        cluster.start_server(first.name, binary)
        while not (meta := first.meta_cluster()):     # monitoring not listening yet
            await asyncio.sleep(0.1)
        assert meta["cluster_size"] == 4 and not meta.get("leader")
        for region in geo.REGIONS[1:]:
            cluster.start_server(region, binary)
        assert cluster.nats is not None
        await asyncio.to_thread(cluster.nats.wait_ready, 60)
        await cluster.check_meta_leader()
    finally:
        await cluster.stop()


async def test_a_stretched_nats_server_whose_port_was_taken_starts_again_on_others(
        tmp_path, monkeypatch):
    """The regions bench picked each server's ports with free_port, in the
    ephemeral range, where any outgoing connection can take one before
    nats-server binds it ("address already in use", and the bench failed).
    Its ports now come from one block below that range, and a server that
    could not bind one has the four started again on another block."""
    from bench import cluster_regions, geo
    from bench.cluster_regions import Stretched
    from bench.targets import free_ports

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked: list[int] = []
    holder = socket.socket()

    def first_pick_taken(count: int, host: str = "127.0.0.1") -> int:
        first = free_ports(count, host)
        if not picked:        # the first block: the second server's route port is someone else's
            holder.bind((host, first + 4))
            holder.listen()
        picked.append(first)
        return first
    monkeypatch.setattr(cluster_regions, "free_ports", first_pick_taken)
    cluster = Stretched(tmp_path, "secret", 0.1)
    try:
        await cluster.start_servers()
        assert len(picked) == 2
        ports = [p for s in cluster.servers.values() for p in (s.port, s.route_port, s.http_port)]
        assert len(ports) == 3 * len(geo.REGIONS) and all(p < low for p in ports)
        assert holder.getsockname()[1] not in ports
        assert all(s.healthy() for s in cluster.servers.values())
        await cluster.check_routes()            # through the new proxies
    finally:
        await cluster.stop()
        holder.close()


def test_regions_with_the_receivers_nodes_claiming_new_chats_deliver_each_message_once(tmp_path):
    """--regions-claim-by receiver: each cross-region pair's receiver reads its new
    chat's history just before the first publish, so its node claims the chat
    while the sender's node writes the first message beside a claim that loses
    (the path of 58d9427, which the default runs never took): every message
    still arrives once and in order, and receivers' nodes own chats."""
    out = tmp_path / "regions.json"
    bench("cluster", "--parts", "regions", "--regions-claim-by", "receiver",
          "--regions-messages", "2", "--regions-rate", "2", "--regions-catchup", "1",
          "--json", str(out), timeout=300)
    regions = json.loads(out.read_text())["regions"]
    assert regions["verdicts"]["delivery"]["ok"]
    for pair in regions["pairs"]:
        assert pair["sent"] == pair["delivered"] == 2 and pair["duplicates"] == 0
    owned_by_receiver = [k for k, owner in regions["owners"].items()
                         if owner == k.split(" -> ")[1] != k.split(" -> ")[0]]
    assert owned_by_receiver
    assert set(regions["first_writes"]) == {"shanghai", "frankfurt", "virginia", "sydney"}
