"""A full disk stops the relay without losing or misreporting anything acked.

The data directory is a 1 MiB tmpfs, mounted for the test (root only; skipped
elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess

import pytest

import fenghuo
from conftest import start_relay
from fenghuo.server.frames import decode_frame_message


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_a_full_disk_stops_the_relay_and_every_ack_is_on_disk(tmp_path, tiny_disk):
    relay = start_relay(tmp_path, "--fsync", "always", data_dir=tiny_disk)
    alice = fenghuo.Client(relay.server, token=relay.token("alice"), reconnect=False)
    await alice.connect()
    acked: dict[int, bytes] = {}
    refused = None
    for _ in range(400):                           # 400 x 16 KiB cannot fit in 1 MiB
        payload = os.urandom(16 * 1024)
        try:
            ack = await asyncio.wait_for(alice.send("bob", payload), 15)
        except (TimeoutError, fenghuo.FenghuoError) as exc:
            refused = exc
            break
        acked[ack.seq] = payload
    assert refused is not None, "the disk never filled up"
    assert relay.proc.wait(30) == 1                 # not a clean stop
    assert "store failed" in relay.log()
    with sqlite3.connect(tiny_disk / "fenghuo.db") as db:
        stored = {seq: decode_frame_message(bytes(frame)).payload
                  for seq, frame in db.execute("SELECT seq, frame FROM messages")}
    assert acked, "nothing was acked before the disk filled"
    for seq, payload in acked.items():
        assert stored[seq] == payload              # every ack was on disk
    await alice.close()
