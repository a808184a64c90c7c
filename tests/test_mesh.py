"""The worker side of the mesh (server/mesh.py): attach from the environment, order, backlog, restarts.

The in-process tests put two :class:`Mesh` objects on the two ends of real
shared-memory rings in one event loop; the others run real worker processes
under a real supervisor (``tests/mesh_worker.py``).
"""

from __future__ import annotations

import asyncio
import json
import gc
import os
import select
import signal

import pytest
from fenghuo.core import ShmRing
from fenghuo.server.mesh import Mesh, WorkerSpec, worker_env
from mesh_worker import Supervised, alive, record


def two_workers(capacity: int) -> tuple[WorkerSpec, WorkerSpec]:
    """Workers 0 and 1 of a mesh of two, in this process, each with its own mapping."""
    rings = {(0, 1): ShmRing.create(capacity), (1, 0): ShmRing.create(capacity)}

    def attached(ring: ShmRing) -> ShmRing:
        return ShmRing.attach([os.dup(fd) for fd in ring.fds])

    zero = WorkerSpec(0, 2, 0, {1: attached(rings[0, 1])}, {1: attached(rings[1, 0])})
    one = WorkerSpec(1, 2, 0, {0: attached(rings[1, 0])}, {0: attached(rings[0, 1])})
    for ring in rings.values():
        ring.close()
    return zero, one


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def open_fds() -> set[str]:
    gc.collect()            # an earlier test's garbage closes its sockets now, not mid-test
    return set(os.listdir("/proc/self/fd"))


def left_open(before: set[str]) -> set[str]:
    """Descriptors open now that were not in ``before``.  Not equality: an earlier
    test's sockets may be closed by the collector meanwhile (CI on 0f75c8f: 17-19
    closed during this test), which says nothing about the rings."""
    return open_fds() - before


def test_from_env_is_none_outside_a_supervisor():
    assert WorkerSpec.from_env({}) is None


def test_from_env_attaches_the_rings_worker_env_describes():
    fds_before = open_fds()
    rings = {(i, j): ShmRing.create(4096) for i in range(3) for j in range(3) if i != j}
    env, fds = worker_env(1, 3, 4, rings)
    assert env["FENGHUO_WORKER"] == "1/3"
    assert sorted(fds) == sorted(fd for key in [(1, 0), (1, 2), (0, 1), (2, 1)]
                                 for fd in rings[key].fds)
    # from_env takes the descriptors over: in this process, hand it copies.
    mesh = json.loads(env["FENGHUO_MESH"])
    for side in ("out", "in"):
        mesh[side] = {peer: [os.dup(fd) for fd in fds] for peer, fds in mesh[side].items()}
    env["FENGHUO_MESH"] = json.dumps(mesh)
    spec = WorkerSpec.from_env(env)
    assert (spec.index, spec.count, spec.generation, spec.peers) == (1, 3, 4, [0, 2])
    assert rings[0, 1].push_bytes(b"from 0") and rings[2, 1].push_bytes(b"from 2")
    assert spec.inbound[0].drain() == [b"from 0"] and spec.inbound[2].drain() == [b"from 2"]
    assert spec.outbound[2].push_bytes(b"to 2") and rings[1, 2].drain() == [b"to 2"]
    spec.close()
    for ring in rings.values():
        ring.close()
    assert not left_open(fds_before)


@pytest.mark.parametrize("worker,mesh,message", [
    ("1", "{}", "INDEX/COUNT"),
    ("3/3", "{}", "not one of 0..2"),
    ("0/2", "not json", "not a mesh description"),
    ("0/2", '{"out": {}, "in": {}}', "every other worker"),
])
def test_from_env_rejects_a_malformed_description(worker, mesh, message):
    with pytest.raises(ValueError, match=message):
        WorkerSpec.from_env({"FENGHUO_WORKER": worker, "FENGHUO_MESH": mesh})


async def test_a_full_ring_backs_up_in_order_with_pressure_and_nothing_is_lost():
    fds_before = open_fds()
    zero, one = two_workers(1024)
    got: list[bytes] = []
    pressure: list[bool] = []
    sender = Mesh(zero, lambda source, rec: None, on_pressure=pressure.append,
                  high_water=4096, low_water=1024)
    receiver = Mesh(one, lambda source, rec: got.append(rec))
    sender.start()
    records = [record(0, seq, 100) for seq in range(1000)]
    direct = [sender.send(1, rec) for rec in records]
    first_refused = direct.index(False)
    assert 0 < first_refused < 50 and not any(direct[first_refused:]), \
        "once one record waits, every later one queues behind it"
    assert sender.backlog(1) == 1000 - first_refused and pressure == [True]
    assert not await sender.flush(0.2), "nobody drains: the backlog cannot empty"
    receiver.start()                                  # the peer starts draining
    assert await sender.flush(10)
    while len(got) < 1000:
        await asyncio.sleep(0.01)
    assert got == records
    assert pressure == [True, False] and sender.backlog(1) == sender.backlog_bytes(1) == 0
    assert (sender.sent, sender.queued, receiver.received) == (1000, 1000 - first_refused, 1000)
    assert sender.close() == 0 and receiver.close() == 0
    assert not left_open(fds_before), "close() leaves no descriptor of the rings open"


async def test_a_handler_error_is_counted_and_later_records_still_arrive():
    zero, one = two_workers(4096)
    got: list[bytes] = []

    def handle(source: int, rec: bytes) -> None:
        if rec == b"bad":
            raise RuntimeError("bad record")
        got.append(rec)

    sender, receiver = Mesh(zero, lambda s, r: None), Mesh(one, handle)
    sender.start()
    receiver.start()
    assert sender.broadcast(b"one") and sender.send(1, b"bad") and sender.send(1, b"two")
    while len(got) < 2:
        await asyncio.sleep(0.01)
    assert got == [b"one", b"two"] and receiver.handler_errors == 1
    with pytest.raises(ValueError, match="at most 2044"):
        sender.send(1, b"x" * 2045)
    sender.close()
    receiver.close()


async def test_a_new_consumer_drains_what_one_that_died_awake_left_behind():
    # A consumer that took its wake-up and died before arming leaves the
    # sleeping flag clear: later pushes write no wake-up, so start() itself
    # must drain instead of waiting for data_fd.
    zero, one = two_workers(4096)
    inbound = one.inbound[0]
    assert zero.outbound[1].push_bytes(b"early") and inbound.ack_wake() == 1
    assert not inbound.consumer_sleeping
    assert zero.outbound[1].push_bytes(b"late") and not readable(inbound.data_fd)
    got: list[bytes] = []
    receiver = Mesh(one, lambda source, rec: got.append(rec))
    receiver.start()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(got) == 2:
            break
    assert got == [b"early", b"late"] and inbound.consumer_sleeping, "drained, then armed"
    receiver.close()
    zero.close()


async def test_close_reports_records_left_in_a_backlog():
    zero, one = two_workers(1024)
    sender = Mesh(zero, lambda s, r: None)
    sender.start()
    sent = [sender.send(1, b"r" * 100) for _ in range(20)]
    assert sender.close() == sent.count(False) > 0
    one.close()


def test_every_worker_gets_every_peers_records_in_order_through_small_rings(tmp_path):
    # 4 KiB rings hold about 35 records; each worker sends 2,000 to each
    # peer at once and handles records slowly, so every ring fills and every
    # sender's backlog takes most of its records.
    with Supervised(tmp_path, 3, ring_capacity=4096,
                    worker_flags=["--records=2000", "--handle-delay=0.0001"]) as mesh:
        results = [mesh.file(f"result-{k}-0.json") for k in range(3)]
        assert mesh.stop() == 0
    for k, result in enumerate(results):
        assert result["faults"] == [] and result["handler_errors"] == 0, k
        assert result["received"] == {str(p): 2000 for p in range(3) if p != k}
        assert result["flushed"] and result["sent"] == 4000
        assert result["queued"] > 3000 and min(result["max_backlog"].values()) > 1000
        assert result["pressure"] == [True, False]


def test_a_killed_worker_comes_back_and_drains_what_was_pushed_to_it_before(tmp_path):
    # Worker 2's first generation attaches but never drains: its peers fill
    # their rings to it and keep the rest in their backlogs.  It is killed;
    # its second generation must find in the same rings the records pushed
    # before the kill, then get the backlogs, all in order.
    with Supervised(tmp_path, 3, ring_capacity=4096, backoff={"initial": 0.1},
                    worker_flags=["--records=300", "--stall=2-0"]) as mesh:
        victim = mesh.file("started-2-0.json")["pid"]
        sent = [mesh.file(f"sent-{k}-0.json") for k in (0, 1)]
        in_ring = [300 - s["backlog"]["2"] for s in sent]
        assert all(0 < n < 300 for n in in_ring), in_ring
        os.kill(victim, signal.SIGKILL)
        restarted = mesh.file("started-2-1.json")
        assert restarted["pid"] != victim and not alive(victim)
        result = mesh.file("result-2-1.json")
        peers = [mesh.file(f"result-{k}-0.json") for k in (0, 1)]
        assert mesh.stop() == 0
    assert result["faults"] == [] and result["received"] == {"0": 300, "1": 300}
    for k, peer in zip((0, 1), peers, strict=True):
        assert peer["faults"] == [] and peer["flushed"]
        assert peer["received"] == {str(p): 300 for p in range(3) if p != k}
