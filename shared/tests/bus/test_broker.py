"""The FastStream binders: routing and validation on `TestNatsBroker`; settling, dead-lettering and the
standing pull that feeds a durable consumer's subscriber against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from faststream.nats import TestNatsBroker
from nats.aio.msg import Msg
from pydantic import BaseModel

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus, PermanentError, TransientError
from visionyard.shared.bus.broker import Batch, consumer, listener, responder, service_broker
from visionyard.shared.events import ProgressReported
from visionyard.shared.natsserver import NatsServer

from .waits import until

SPEC = streams.API_PROJECTOR


class Question(BaseModel):
    job_id: str


class Parked:
    """A `DeadLetters` that notes what it was given."""

    def __init__(self) -> None:
        self.reasons: list[tuple[str, str]] = []

    async def dead_letter(self, msg: Msg, *, consumer: str, reason: str) -> None:
        self.reasons.append((msg.subject, reason))


def progress(seq: int, job_id: str = "broker") -> ProgressReported:
    return ProgressReported(job_id=job_id, attempt=1, seq=seq, epoch=seq, total_epochs=100)


async def test_a_responder_answers_with_its_handlers_reply_and_names_a_bad_field() -> None:
    broker = service_broker("nats://127.0.0.1:1", service="test")

    @responder(broker, "test.ask", queue="test")
    async def answer(question: Question) -> dict[str, str]:
        if question.job_id == "boom":
            raise RuntimeError("store unavailable")
        return {"job": question.job_id}

    async with TestNatsBroker(broker) as test_broker:
        good = await test_broker.request(Question(job_id="7"), "test.ask")
        assert json.loads(good.body) == {"job": "7"}
        failed = await test_broker.request(Question(job_id="boom"), "test.ask")
        assert json.loads(failed.body) == {"ok": False, "error": "RuntimeError: store unavailable"}
        invalid = await test_broker.request({"jobid": 7}, "test.ask")
        reply = json.loads(invalid.body)
        assert reply["ok"] is False and "job_id" in reply["error"]


async def test_a_listener_logs_a_failing_hint_and_keeps_listening() -> None:
    broker = service_broker("nats://127.0.0.1:1", service="test")
    seen: list[str] = []

    @listener(broker, "test.hint", queue="test")
    async def on_hint(question: Question) -> None:
        seen.append(question.job_id)
        if question.job_id == "bad":
            raise RuntimeError("hint failed")

    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(Question(job_id="bad"), "test.hint")
        await test_broker.publish(Question(job_id="good"), "test.hint")
    assert seen == ["bad", "good"]


async def test_a_consumer_routes_its_subjects_and_dead_letters_an_invalid_payload() -> None:
    broker = service_broker("nats://127.0.0.1:1", service="test")
    parked = Parked()
    broker.dead_letters = parked
    seen: list[int] = []

    @consumer(broker, SPEC, subjects=[subjects.EVT_JOB_ALL])
    async def on_progress(event: ProgressReported) -> None:
        seen.append(event.seq)

    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(progress(3), progress(3).subject())
        await test_broker.publish({"job_id": "x", "seq": "not a number"}, subjects.job_event("x", "progress"))
    assert seen == [3]
    assert len(parked.reasons) == 1
    subject, reason = parked.reasons[0]
    assert subject == "evt.job.x.progress"
    assert reason.startswith("invalid payload") and "seq" in reason


@pytest.mark.integration
async def test_the_standing_pull_feeds_the_subscriber_and_settles_each_outcome(nats_server: NatsServer) -> None:
    """Handled → acked; permanent → dead-lettered and terminated; transient → redelivered and then handled."""
    publisher = await Bus.connect(nats_server.url, service="publisher")
    await publisher.ensure_topology()
    broker = service_broker(nats_server.url, service="test")
    handled: list[int] = []
    attempts: dict[int, int] = {}

    @consumer(broker, SPEC, batch=10)
    async def on_event(event: ProgressReported) -> None:
        attempts[event.seq] = attempts.get(event.seq, 0) + 1
        if event.seq == 2:
            raise PermanentError("seq 2 can never be applied")
        if event.seq == 3 and attempts[3] == 1:
            raise TransientError("database away")
        handled.append(event.seq)

    bus = await Bus.from_broker(broker)
    await broker.start()
    try:
        for seq in (1, 2, 3, 4):
            await publisher.publish(progress(seq))
        await until(lambda: sorted(handled) == [1, 3, 4])
        assert attempts == {1: 1, 2: 1, 3: 2, 4: 1}

        async def settled() -> bool:
            info = await bus.js.consumer_info(SPEC.stream, SPEC.durable)
            return info.num_ack_pending == 0 and info.num_pending == 0

        deadline = time.monotonic() + 20
        while not await settled():
            assert time.monotonic() < deadline, "messages left unsettled"
            await asyncio.sleep(0.05)
        parked = await publisher.js.get_last_msg(streams.DEADLETTERS.name, subjects.dead_letter(SPEC.durable))
        assert parked.headers is not None
        assert parked.headers["Visionyard-Original-Subject"] == progress(2).subject()
        assert "can never be applied" in parked.headers["Visionyard-Reason"]
    finally:
        await bus.close()
        await publisher.close()


@pytest.mark.integration
async def test_a_batched_consumer_gets_what_arrived_and_a_raise_naks_the_batch(nats_server: NatsServer) -> None:
    publisher = await Bus.connect(nats_server.url, service="publisher")
    await publisher.ensure_topology()
    broker = service_broker(nats_server.url, service="test")
    batches: list[list[str]] = []
    fail_once = [True]

    @consumer(broker, SPEC, batch=50, linger=0.2, batched=True)
    async def on_batch(batch: Batch) -> None:
        batches.append([json.loads(m.data)["seq"] for m in batch.raw_message])
        if fail_once[0]:
            fail_once[0] = False
            raise TransientError("store away")

    for seq in range(1, 6):
        await publisher.publish(progress(seq))
    bus = await Bus.from_broker(broker)
    await broker.start()
    try:
        await until(lambda: len(batches) >= 2)
        # The first batch failed as a whole and came back whole: nothing was applied twice or lost.
        assert sorted(batches[0]) == [1, 2, 3, 4, 5]
        assert sorted(batches[1]) == [1, 2, 3, 4, 5]
    finally:
        await bus.close()
        await publisher.close()
