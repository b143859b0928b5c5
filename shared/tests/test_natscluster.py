"""A 3-node NATS cluster on loopback (`NatsCluster`): the topology at R3, and a bus that rides through
losing the node that leads its stream (a leader election while it publishes and consumes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, consumer
from visionyard.shared.events import LogEmitted
from visionyard.shared.natsserver import NatsCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three clustered nodes with JetStream, each with its own store."""
    started = NatsCluster(root=tmp_path / "cluster", size=3).start()
    yield started
    started.stop()


def test_the_nodes_agree_on_a_meta_leader_and_elect_another_without_it(cluster: NatsCluster) -> None:
    assert len(cluster.url.split(",")) == 3 and all(node.running for node in cluster.nodes)
    leader = cluster.meta_leader()
    assert leader in {node.server_name for node in cluster.nodes}
    cluster.node_named(leader).stop(kill=True)
    survivor_leader = cluster.wait_for_meta_leader(timeout=60)
    assert survivor_leader != leader


async def test_topology_is_declared_at_three_replicas_and_later_buckets_follow(cluster: NatsCluster) -> None:
    bus = await Bus.connect(cluster.url, service="test")
    try:
        await bus.ensure_topology(replicas=3)
        names = [spec.name for spec in streams.STREAMS]
        names += [f"KV_{bucket}" for bucket in streams.KV_BUCKETS] + [f"OBJ_{streams.OBJECT_STAGING}"]
        for name in names:
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, name
        # A bucket first used after the topology was declared is replicated like the rest.
        await bus.kv("made_later")
        assert (await bus.js.stream_info("KV_made_later")).config.num_replicas == 3
    finally:
        await bus.close()


class _Heard(logging.Handler):
    """Sets `event` (on `loop`) when a record's message contains `words`."""

    def __init__(self, words: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.WARNING)
        self.words = words
        self.loop = loop
        self.event = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.messages.append(record.getMessage())
            self.loop.call_soon_threadsafe(self.event.set)


async def test_a_service_declaring_while_the_cluster_has_no_quorum_waits_for_it(cluster: NatsCluster) -> None:
    # Two of three nodes gone: the one left has no JetStream meta leader and cannot answer a declaration
    # (CI once saw a tracker exit on such an unanswered request while 13 processes started on 2 cores).
    survivor, *others = cluster.nodes
    for node in others:
        node.stop()
    heard = _Heard("JetStream did not answer declaring", asyncio.get_running_loop())
    logging.getLogger("visionyard.bus").addHandler(heard)
    bus = await Bus.connect(survivor.url, service="test")
    try:
        declaring = asyncio.create_task(bus.ensure_topology(replicas=3))
        async with asyncio.timeout(60):
            await heard.event.wait()
        assert not declaring.done(), "the declaration should be waiting for the cluster"
        for node in others:
            await asyncio.to_thread(node.start)
        async with asyncio.timeout(120):
            await declaring
        for spec in streams.STREAMS:
            assert (await bus.js.stream_info(spec.name)).config.num_replicas == 3, spec.name
        assert heard.messages[0].startswith(f"JetStream did not answer declaring stream {streams.STREAMS[0].name}")
    finally:
        logging.getLogger("visionyard.bus").removeHandler(heard)
        await bus.close()


async def test_a_declaration_gives_up_after_its_patience_naming_what_it_declared(
    cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    survivor, *others = cluster.nodes
    for node in others:
        node.stop()
    monkeypatch.setenv("VISIONYARD_TOPOLOGY_DECLARE_PATIENCE", "3")
    bus = await Bus.connect(survivor.url, service="test")
    bus.js = bus.nc.jetstream(timeout=1.0)
    try:
        with pytest.raises(TimeoutError, match=f"declaring stream {streams.STREAMS[0].name} within 3s"):
            await bus.ensure_topology(replicas=3)
    finally:
        await bus.close()


async def test_a_bus_publishes_and_consumes_through_the_loss_of_its_streams_leader(cluster: NatsCluster) -> None:
    bus = await Bus.connect(cluster.url, service="test")
    observer = await nats.connect(cluster.url.split(","))
    received: list[int] = []
    broker = attached(bus, service="test")

    @consumer(broker, streams.TRACKER, batch=100)
    async def handle(event: LogEmitted) -> None:
        received.append(event.seq)

    try:
        await bus.ensure_topology(replicas=3)
        await broker.start()

        async def publish(seq: int) -> None:
            # As the runner's publisher does: retry until the PubAck, the message id de-duplicating.
            event = LogEmitted(job_id="1", attempt=1, seq=seq, level="INFO", message=f"line {seq}")
            for _ in range(200):
                try:
                    await bus.publish(event)
                    return
                except Exception:  # no leader yet (no responders, a timeout): ask again
                    await asyncio.sleep(0.1)
            raise AssertionError(f"event {seq} was never acknowledged")

        for seq in range(1, 21):
            await publish(seq)
        leader = (await observer.jetstream().stream_info(streams.EVENTS.name)).cluster.leader
        cluster.node_named(leader).stop(kill=True)
        for seq in range(21, 41):
            await publish(seq)
        async with asyncio.timeout(90):
            while sorted(set(received)) != list(range(1, 41)):
                await asyncio.sleep(0.1)
        info = await bus.js.stream_info(streams.EVENTS.name)
        assert info.cluster is not None and info.cluster.leader != leader
        assert info.state.messages == 40  # every event stored once, retries included
    finally:
        await broker.stop()
        await observer.close()
        await bus.close()
