"""The tracker's FastStream subscribers on `TestNatsBroker`: what reaches the use cases, what is refused."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from faststream.nats import TestNatsBroker

from visionyard.shared import subjects
from visionyard.shared.asyncapi import undocumented
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.events import JobEvent, LogEmitted
from visionyard.shared.requests import TrackerQuery
from visionyard.tracker.handlers import TrackerHandlers, subscribe

from .test_service import completed, progress, started, tracker_for


class FakeMsg:
    def __init__(self, event: JobEvent | None = None, *, subject: str = "", data: bytes = b"") -> None:
        self.subject = event.subject() if event else subject
        self.data = event.to_bytes() if event else data
        self.metadata = SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=1))
        self.termed = False

    async def term(self) -> None:
        self.termed = True


class FakeDeadLetters:
    def __init__(self) -> None:
        self.parked: list[tuple[str, str]] = []

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        self.parked.append((msg.subject, reason))


async def test_a_batch_dead_letters_only_its_poison_message(fake_store, fake_publisher) -> None:
    dead = FakeDeadLetters()
    handlers = TrackerHandlers(tracker=tracker_for(fake_store, fake_publisher), dead_letters=dead)
    poison = FakeMsg(subject="evt.job.job1.progress", data=b"{not json")
    log_line = FakeMsg(LogEmitted(job_id="job1", attempt=1, message="hi"))
    messages = [FakeMsg(started()), poison, FakeMsg(progress(1)), log_line]
    await handlers.on_job_events(SimpleNamespace(raw_message=messages))  # type: ignore[arg-type]

    assert poison.termed and [s for s, _ in dead.parked] == ["evt.job.job1.progress"]
    assert not any(m.termed for m in messages if m is not poison)
    assert len(fake_store.runs_of("job1")[0].points) == 2


def tracker_broker(fake_store: Any, fake_publisher: Any) -> tuple[Any, FakeDeadLetters]:
    broker = service_broker("nats://127.0.0.1:1", service="tracker")
    dead = FakeDeadLetters()
    broker.dead_letters = dead
    subscribe(broker, TrackerHandlers(tracker=tracker_for(fake_store, fake_publisher), dead_letters=dead),
              batch=100, linger=0.0)
    return broker, dead


async def test_job_events_are_routed_to_the_run_and_a_bad_job_id_is_dead_lettered(fake_store, fake_publisher) -> None:
    broker, dead = tracker_broker(fake_store, fake_publisher)
    async with TestNatsBroker(broker) as test_broker:
        for event in (started(), progress(1), progress(2), completed()):
            await test_broker.publish(event.to_bytes(), event.subject())
        bad = progress(1, job_id="../etc")
        await test_broker.publish(bad.to_bytes(), subjects.job_event("x", "progress"))
    (run,) = fake_store.runs_of("job1")
    assert [p.key for p in run.points][:4] == ["loss", "accuracy", "loss", "accuracy"] and run.status == "FINISHED"
    assert [subject for subject, _ in dead.parked] == ["evt.job.x.progress"]
    assert "invalid job id" in dead.parked[0][1]


async def test_queries_answer_a_runs_metrics_and_name_a_missing_field(fake_store, fake_publisher) -> None:
    broker, _ = tracker_broker(fake_store, fake_publisher)
    async with TestNatsBroker(broker) as test_broker:
        for event in (started(), progress(1, loss=0.5), progress(2, loss=0.25)):
            await test_broker.publish(event.to_bytes(), event.subject())
        summary = json.loads((await test_broker.request(TrackerQuery(job_id="job1"), subjects.TRACKER_SUMMARY)).body)
        history = json.loads((await test_broker.request(TrackerQuery(job_id="job1"), subjects.TRACKER_METRICS)).body)
        unknown = json.loads((await test_broker.request(TrackerQuery(job_id="nope"), subjects.TRACKER_METRICS)).body)
        invalid = json.loads((await test_broker.request({"job": "job1"}, subjects.TRACKER_SUMMARY)).body)
    assert summary["found"] is True and summary["latest_metrics"]["loss"] == 0.25
    assert [point["value"] for point in history["metrics"]["loss"]] == [0.5, 0.25]
    assert unknown["found"] is False
    assert invalid["ok"] is False and "job_id" in invalid["error"]


def test_every_subscriber_is_in_the_platforms_asyncapi_document(fake_store, fake_publisher) -> None:
    broker, _ = tracker_broker(fake_store, fake_publisher)
    assert undocumented(broker) == []


async def test_an_event_of_an_unknown_major_version_is_dead_lettered_with_the_reason(fake_store, fake_publisher) -> None:
    broker, dead = tracker_broker(fake_store, fake_publisher)
    newer = {**json.loads(progress(1).to_bytes()), "schema_version": "2.0"}
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(started().to_bytes(), started().subject())
        await test_broker.publish(json.dumps(newer).encode(), progress(1).subject())
    [(subject, reason)] = dead.parked
    assert subject == progress(1).subject() and "schema_version 2.0" in reason
    assert fake_store.runs_of("job1")[0].points == []
