"""A replica node's asks of an owner node for its channels (``interest``) and their
answers (``warm``) when they come in a burst: an owner's heads records lost,
an owner restarted (docs/DESIGN.md, "An owner lists its busy channels'
heads").  Real nats-servers, real node processes, bare client connections."""

from __future__ import annotations

import asyncio
import re

from fenghuo.server.node_cluster import HEADS_INTERVAL, HEADS_REPEAT
from fenghuo.server.routing import CHANNELS_PER_RECORD
from scripts.nats_cluster import NatsCluster
from rawwire import authed_raw
from test_cluster import LiveSeqs, WritesHeld, a_follower, healthz, until
from test_cluster import nodes  # noqa: F401,F811  (the fixture)
from test_cluster_setup import NatsProxy

ASK, HEADS = b'"op":"interest"', b'"op":"heads"'
GROUP_NAME = re.compile(rb'"(group:[^"]+)"')


class AsksCounted(NatsProxy):
    """A replica node's link to its nats-server that counts the records it
    publishes asking an owner for channels (``interest``), and how often each
    channel was asked for, and the heads records it is sent; everything
    passes both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.records = 0
        self.asked: dict[str, int] = {}
        self.heads = 0

    def reset(self) -> None:
        self.records, self.asked = 0, {}

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            if words[:1] in ([b"PUB"], [b"HPUB"]) and ASK in frame:
                self.records += 1
                for named in GROUP_NAME.finditer(frame):
                    name = named.group(1).decode()
                    self.asked[name] = self.asked.get(name, 0) + 1
            writer.write(frame)
        writer.close()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: asyncio.StreamWriter) -> None:
        async for words, frame in self._frames(reader):
            if words[:1] in ([b"MSG"], [b"HMSG"]) and HEADS in frame:
                self.heads += 1
            writer.write(frame)
        writer.close()


async def groups_on_n1(alice, carol: LiveSeqs, count: int, name: str) -> list[str]:
    """``count`` groups alice (n0) creates with carol (n1): n0 sequences them,
    carol has each one's created event (seq 1) live."""
    groups = []
    for i in range(count):
        await alice.create_group(f"{name}{i}", ["carol"])
        groups.append(f"group:{name}{i}")
    await carol.until_all(groups, 1, 30)
    assert all(carol.by_channel.get(g) == [1] for g in groups), carol.by_channel
    return groups


async def test_many_replicas_asked_again_at_once_travel_in_one_record_and_all_reach_the_replica(
        nodes, nats_cluster: NatsCluster):  # noqa: F811
    """Every record n0 sends n1 is lost for longer than its 40 groups stay in its
    heads lists, the records of a message to each among them: the first list
    after the loss has a number skipped, so n1 asks again for every replica
    n0 feeds it, and carol gets each group's message live.  The 40 asks go
    in one record (up to CHANNELS_PER_RECORD a record), and n0 counts that
    one record.  Before, n1 sent one record per channel: 40."""
    server = await a_follower(nats_cluster)
    records = WritesHeld((server.host, server.port), "fh.node.")   # n0's records to other nodes
    others = [s for s in nats_cluster.servers if s is not server]
    asks = AsksCounted((others[0].host, others[0].port))
    (n0,) = await asyncio.to_thread(nodes, "n0", urls=[await records.start()])
    (n1,) = await asyncio.to_thread(nodes, "n1", urls=[await asks.start()])
    try:
        alice = await n0.connect("alice")
        carol = LiveSeqs(await authed_raw(n1, "carol"))
        groups = await groups_on_n1(alice, carol, 40, "burst")
        assert len(groups) < CHANNELS_PER_RECORD
        records.holding = True
        for g in groups:
            assert (await alice.publish(g, "lost")).seq == 2

        async def lists_held() -> bool:
            # a list naming the groups, then lists more than they stay in
            return sum(b'"op":"heads"' in f for f in records.held) >= HEADS_REPEAT + 2
        await until(lists_held, 30)
        await asyncio.sleep(1.5 * HEADS_INTERVAL)
        received_before = healthz(n0.metrics_port)[1]["cluster"]["ask_records_received"]
        asks.reset()
        records.holding = False                 # all of it dropped; every server stays up
        await carol.until_all(groups, 2, 30)
        assert all(carol.by_channel[g] == [1, 2] for g in groups), carol.by_channel
        assert sorted(asks.asked) == sorted(groups) and set(asks.asked.values()) == {1}, asks.asked
        assert asks.records == 1, asks.records
        state = healthz(n0.metrics_port)[1]["cluster"]
        assert state["ask_records_received"] - received_before == 1, state
        assert healthz(n1.metrics_port)[1]["cluster"]["heads_missed"] >= 1
    finally:
        await records.close()
        await asks.close()


async def test_an_owner_restarted_within_its_lease_is_asked_once_per_channel_and_repeated_once(
        nodes, nats_cluster: NatsCluster):  # noqa: F811
    """n0, which sequences 20 groups carol on n1 is in, is killed (-9) and started
    again within its lease.  n1 asks the new process for each channel in one
    round (whichever of its lease and its first heads record shows it first),
    not again when its heads records are numbered from 1 (no record is
    missed), and once more, unanswered, after ASK_PATIENCE records (the new
    process owns none of them until it claims them again).  Carol still gets
    a group's next message.  Before, each channel was asked for three times
    (at the lease, at the number from 1, and the repeat), each ask a record."""
    lease = ("--cluster-lease", "30")             # a restart, not a failover
    asks = AsksCounted(("", 0))
    servers = nats_cluster.servers
    asks.target = (servers[0].host, servers[0].port)
    (n0,) = await asyncio.to_thread(nodes, "n0", flags=lease)
    (n1,) = await asyncio.to_thread(nodes, "n1", flags=lease, urls=[await asks.start()])
    try:
        alice = await n0.connect("alice")
        carol = LiveSeqs(await authed_raw(n1, "carol"))
        groups = await groups_on_n1(alice, carol, 20, "again")
        seen = asks.heads

        async def numbered() -> bool:
            return asks.heads >= seen + 2            # n1 knows n0's heads numbers
        await until(numbered, 30)
        before = healthz(n1.metrics_port)[1]["cluster"]
        asks.reset()
        await asyncio.to_thread(n0.kill)
        (n0,) = await asyncio.to_thread(nodes, "n0", flags=lease)

        async def repeated() -> bool:
            state = healthz(n1.metrics_port)[1]["cluster"]
            return state["asks_repeated"] - before["asks_repeated"] >= len(groups)
        await until(repeated, 60)
        await asyncio.sleep(3 * HEADS_INTERVAL)          # nothing more comes
        after = healthz(n1.metrics_port)[1]["cluster"]
        assert after["heads_missed"] == before["heads_missed"], after
        assert sorted(asks.asked) == sorted(groups), asks.asked
        assert set(asks.asked.values()) == {2}, asks.asked    # the round, and its repeat
        assert asks.records == 2, asks.records
        alice = await n0.connect("alice")
        assert (await alice.publish(groups[0], "after")).seq == 2
        await carol.until_all(groups[:1], 2, 30)
        assert carol.by_channel[groups[0]] == [1, 2], carol.by_channel
    finally:
        await asks.close()
