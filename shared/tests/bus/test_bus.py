"""The bus against a real nats-server: de-duplicated publish, explicit acks, backoff, dead letters."""

from __future__ import annotations

from pathlib import Path

import pytest
from faststream.nats.annotations import NatsMessage

from visionyard.shared import streams, subjects
from visionyard.shared.bus import AckAction, Bus, PermanentError, decide_ack
from visionyard.shared.bus.broker import Batch, attached, consumer
from visionyard.shared.events import ProgressReported, decode_job_event

from .waits import until_consumer

pytestmark = pytest.mark.integration


async def test_publish_with_same_message_id_is_stored_once(bus: Bus) -> None:
    event = ProgressReported(job_id="j1", attempt=1, seq=1, epoch=1, total_epochs=2, metrics={"loss": 1.0})
    first = await bus.publish(event)
    second = await bus.publish(event)
    assert second.duplicate is True
    assert first.seq == second.seq
    info = await bus.js.stream_info(streams.EVENTS.name)
    assert info.state.messages == 1


async def test_consumer_redelivers_after_transient_error_and_dead_letters_poison(bus: Bus) -> None:
    spec = streams.API_PROJECTOR
    await bus.publish(ProgressReported(job_id="j2", attempt=1, seq=1, epoch=1, total_epochs=1))
    await bus.publish_raw(subjects.job_event("j2", "progress"), b"not json", message_id="poison")
    deliveries: list[int] = []
    broker = attached(bus, service="test")

    @consumer(broker, spec, batch=10)
    async def handle(event: ProgressReported, message: NatsMessage) -> None:
        assert message.raw_message.metadata is not None
        deliveries.append(message.raw_message.metadata.num_delivered)
        if len(deliveries) == 1:
            raise ConnectionError("database away")

    await broker.start()
    try:
        await until_consumer(bus, spec, lambda info: len(deliveries) >= 2 and info.num_pending == 0
                             and info.num_ack_pending == 0)
    finally:
        await broker.stop()
    assert deliveries == [1, 2]  # the good one came back after its nak; the poison one never reached the handler
    dlq = await bus.js.stream_info(streams.DEADLETTERS.name)
    assert dlq.state.messages == 1
    parked = await bus.js.get_last_msg(streams.DEADLETTERS.name, subjects.dead_letter(spec.durable))
    assert parked.data == b"not json" and parked.headers is not None
    assert parked.headers["Visionyard-Original-Subject"] == subjects.job_event("j2", "progress")
    assert parked.headers["Visionyard-Reason"].startswith("invalid payload")


def test_ack_decision_backs_off_and_bounds_redelivery() -> None:
    spec = streams.ConsumerSpec(stream="S", durable="d", filter_subjects=("x",), max_deliver=4, backoff_base=1, backoff_cap=5)
    assert decide_ack(None, delivered=1, spec=spec).action is AckAction.ACK
    delays = [decide_ack(RuntimeError(), delivered=n, spec=spec).delay for n in (1, 2, 3)]
    assert delays == [1, 2, 4]
    last = decide_ack(RuntimeError(), delivered=4, spec=spec)
    assert last.action is AckAction.TERM and last.dead_letter
    assert decide_ack(PermanentError(), delivered=1, spec=spec).dead_letter


async def test_object_store_round_trip_verifies_sha256(bus: Bus, tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(b"x" * 300_000)
    sha, size = await bus.put_file("t/blob", source)
    copy = await bus.get_file("t/blob", tmp_path / "copy.bin", sha256=sha)
    assert copy.read_bytes() == source.read_bytes() and size == 300_000
    with pytest.raises(PermanentError):
        await bus.get_file("t/blob", tmp_path / "bad.bin", sha256="0" * 64)
    assert not (tmp_path / "bad.bin").exists()


async def test_lingering_batches_gather_a_trickle_into_one_handler_call(bus: Bus) -> None:
    # A handler paying per call (the tracker's MLflow writes) sees a trickle of events together.
    spec = streams.TRACKER
    calls: list[list[int]] = []
    broker = attached(bus, service="test")

    @consumer(broker, spec, batch=100, linger=3.0, batched=True)
    async def handle(batch: Batch) -> None:
        calls.append([decode_job_event(m.subject, m.data).seq for m in batch.raw_message])

    await broker.start()
    try:
        await bus.publish(ProgressReported(job_id="trickle", attempt=1, seq=1, epoch=1, total_epochs=5))
        # The first is with the pull (delivered, not yet settled): from here it lingers while the rest arrive.
        await until_consumer(bus, spec, lambda info: info.num_ack_pending == 1)
        for seq in range(2, 6):
            await bus.publish(ProgressReported(job_id="trickle", attempt=1, seq=seq, epoch=seq, total_epochs=5))
        # Settled (acked by the settling middleware) only once the handler has had them.
        await until_consumer(bus, spec, lambda info: info.num_pending == 0 and info.num_ack_pending == 0)
    finally:
        await broker.stop()
    # The first message opens a 3 s window; the other four arrive within it, so at most the first
    # fetch and the lingered rest: never one call per message.
    assert [seq for call in calls for seq in call] == [1, 2, 3, 4, 5]
    assert len(calls) == 1
