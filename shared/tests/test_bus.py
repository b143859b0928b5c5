"""The bus against a real nats-server: de-duplicated publish, explicit acks, backoff, dead letters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from visionyard.shared import streams, subjects
from visionyard.shared.bus import AckAction, Bus, PermanentError, decide_ack
from visionyard.shared.events import ProgressReported, decode_job_event

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
    seen: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def handle(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append((msg.subject, msg.metadata.num_delivered))
        try:
            decode_job_event(msg.subject, msg.data)
        except ValueError as error:
            raise PermanentError(str(error)) from error
        if msg.metadata.num_delivered == 1:
            raise ConnectionError("database away")
        if len([s for s in seen if s[1] >= 2]) >= 1:
            stop.set()

    await asyncio.wait_for(bus.consume(spec, handle, stop=stop, batch=10), timeout=20)
    deliveries = [d for s, d in seen]
    assert deliveries.count(1) == 2  # the good one and the poison one
    assert 2 in deliveries  # the good one came back after its nak
    dlq = await bus.js.stream_info(streams.DEADLETTERS.name)
    assert dlq.state.messages == 1
    consumer = await bus.js.consumer_info(spec.stream, spec.durable)
    assert consumer.num_ack_pending == 0


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
    stop = asyncio.Event()
    calls: list[list[int]] = []

    async def handle(messages) -> None:  # type: ignore[no-untyped-def]
        calls.append([decode_job_event(m.subject, m.data).seq for m in messages])
        for msg in messages:
            await msg.ack()
        if sum(len(c) for c in calls) >= 5:
            stop.set()

    async def trickle() -> None:
        for seq in range(1, 6):
            await bus.publish(ProgressReported(job_id="trickle", attempt=1, seq=seq, epoch=seq, total_epochs=5))
            await asyncio.sleep(0.05)

    publisher = asyncio.create_task(trickle())
    await asyncio.wait_for(bus.consume_batches(spec, handle, stop=stop, batch=100, linger=3.0), timeout=60)
    await publisher
    # The first message opens a 3 s window; the other four arrive within it, so at most the first
    # fetch and the lingered rest: never one call per message.
    assert [seq for call in calls for seq in call] == [1, 2, 3, 4, 5]
    assert len(calls) == 1
    await bus.nc.flush()  # acks are plain publishes
    consumer = await bus.js.consumer_info(spec.stream, spec.durable)
    assert consumer.num_ack_pending == 0
