"""The API's FastStream subscribers on `TestNatsBroker`: the projector's and the scheduler's.

What each projection does is tested in the domains' projection tests (and test_projector.py); here, what
reaches the projector and the scheduler from which subjects, and what is refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from faststream.nats import TestNatsBroker

from visionyard.api.handlers import ProjectorHandler, subscribe
from visionyard.api.projector import Rejected
from visionyard.api.scheduling.handlers import SchedulerRuntime
from visionyard.api.scheduling.handlers import subscribe as subscribe_scheduler
from visionyard.shared import subjects
from visionyard.shared.asyncapi import undocumented
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.events import DatasetReady, ExportStarted, JobCompleted, LogEmitted, ProgressReported


class RecordingProjector:
    """Stands in for the projection use cases: notes each batch; refuses events of job `poison`."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def apply_batch(self, events: list[tuple[Any, Any]]) -> list[Rejected[Any]]:
        self.batches.append([event for _, event in events])
        return [Rejected(token, "no such job") for token, event in events if getattr(event, "job_id", "") == "poison"]


class Parked:
    def __init__(self) -> None:
        self.reasons: list[tuple[str, str, str]] = []

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        self.reasons.append((consumer, msg.subject, reason))


def api_broker() -> tuple[Any, RecordingProjector, Parked]:
    broker = service_broker("nats://127.0.0.1:1", service="api")
    parked, projector = Parked(), RecordingProjector()
    broker.dead_letters = parked
    subscribe(broker, ProjectorHandler(projector=projector, dead_letters=parked), batch=100)  # type: ignore[arg-type]
    return broker, projector, parked


async def test_events_of_every_family_reach_the_projector_decoded() -> None:
    broker, projector, parked = api_broker()
    progress = ProgressReported(job_id="7", attempt=1, seq=2, epoch=1, total_epochs=3)
    log = LogEmitted(job_id="7", attempt=1, seq=3, message="epoch 1")
    ready = DatasetReady(dataset_id="d1", content_hash="c0ffee", num_images=10, num_classes=2, format="imagefolder",
                         class_names=["a", "b"], size_bytes=100, uri="s3://internal/datasets/d1/c0ffee.zip")
    export = ExportStarted(job_id="x1", attempt=1, seq=1, training_job_id="7", runner_id="r1")
    async with TestNatsBroker(broker) as test_broker:
        for event, subject in ((progress, progress.subject()), (log, log.subject()), (ready, ready.subject()),
                               (export, export.subject())):
            await test_broker.publish(event.to_bytes(), subject)
    assert [batch for batch in projector.batches] == [[progress], [log], [ready], [export]]
    assert parked.reasons == []


async def test_poison_is_dead_lettered_alone_with_its_reason() -> None:
    broker, projector, parked = api_broker()
    refused = JobCompleted(job_id="poison", attempt=1, seq=9, final_metrics={})
    newer = {**json.loads(ProgressReported(job_id="7", attempt=1, seq=4, epoch=2, total_epochs=3).to_bytes()),
             "schema_version": "2.0"}
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(b"{not json", subjects.job_event("7", "progress"))
        await test_broker.publish(newer, subjects.job_event("7", "progress"))
        await test_broker.publish(refused.to_bytes(), refused.subject())
    assert [(consumer, subject) for consumer, subject, _ in parked.reasons] == [
        ("api-projector", "evt.job.7.progress"), ("api-projector", "evt.job.7.progress"),
        ("api-projector", "evt.job.poison.completed"),
    ]
    assert "undecodable" in parked.reasons[0][2]
    assert "schema_version 2.0" in parked.reasons[1][2]
    assert parked.reasons[2][2] == "no such job"
    assert projector.batches[-1] == [refused]


class Book:
    """Stands in for a leading scheduler: notes the runner events it is given."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def on_events(self, events: list[Any]) -> None:
        self.events.extend(events)


async def test_runner_events_reach_the_leading_scheduler_and_nothing_else_does() -> None:
    broker = service_broker("nats://127.0.0.1:1", service="api")
    runtime = SchedulerRuntime(None, scheduler_id="test")  # type: ignore[arg-type]
    subscribe_scheduler(broker, runtime)
    book = Book()
    runtime._term = (book, asyncio.Event(), [])  # type: ignore[assignment]  # a term is running
    async with TestNatsBroker(broker) as test_broker:
        for kind in ("started", "progress", "completed"):
            await test_broker.publish({"job_id": "7", "attempt": 1}, subjects.job_event("7", kind))
    assert [(event.kind, event.job_id, event.attempt) for event in book.events] == [
        ("started", "7", 1), ("completed", "7", 1)
    ]


def test_every_subscriber_is_in_the_platforms_asyncapi_document() -> None:
    broker, _, _ = api_broker()
    subscribe_scheduler(broker, SchedulerRuntime(None, scheduler_id="test"))  # type: ignore[arg-type]
    assert undocumented(broker) == []
