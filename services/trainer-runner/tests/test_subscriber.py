"""The runner's FastStream subscriber on `TestNatsBroker`: each command kind reaches its use case by subject,
validated into its model; an invalid command is dead-lettered with the field named.

The claim loop that feeds it in production (one command per free slot) and the holding are tested against a
real server in test_handlers.py and test_export_inference.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from faststream.nats import TestNatsBroker
from pydantic import BaseModel

from visionyard.runner.handlers import CommandConsumer, CommandHandlers, _run_and_settle, subscribe
from visionyard.runner.service import AttemptOutcome
from visionyard.shared import streams, subjects
from visionyard.shared.asyncapi import undocumented
from visionyard.shared.bus import TransientError
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.bus.held import HeldMessage
from visionyard.shared.commands import (
    CheckpointRef,
    DatasetRef,
    StartExport,
    StartInference,
    StartTraining,
    TrainingConfig,
)


class Recorded:
    """Stands in for the training attempts and the export/inference runs: notes each command it runs."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, BaseModel, Any]] = []
        self.held = self

    def request_stop(self, job_id: str, reason: Any, **_: Any) -> None:  # pragma: no cover - the broker is never lost here
        raise AssertionError("no stop expected")

    async def run(self, command: StartTraining, **options: Any) -> AttemptOutcome:
        self.ran.append(("train", command, options.get("gpus")))
        return AttemptOutcome.FINISHED

    async def run_export(self, command: StartExport, **_: Any) -> AttemptOutcome:
        self.ran.append(("export", command, None))
        return AttemptOutcome.FINISHED

    async def run_inference(self, command: StartInference, **_: Any) -> AttemptOutcome:
        self.ran.append(("infer", command, None))
        return AttemptOutcome.FINISHED


class Parked:
    def __init__(self) -> None:
        self.reasons: list[tuple[str, str]] = []

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        self.reasons.append((msg.subject, reason))


def runner_broker() -> tuple[Any, Recorded, Parked]:
    recorded, parked = Recorded(), Parked()
    broker = service_broker("nats://127.0.0.1:1", service="trainer-runner")
    broker.dead_letters = parked
    handlers = CommandHandlers(recorded, recorded, spec=streams.RUNNER, heartbeat_seconds=20,  # type: ignore[arg-type]
                               dead_letter=parked.dead_letter)
    subscribe(broker, handlers, CommandConsumer(None, handlers, slots=1), streams.RUNNER)  # type: ignore[arg-type]
    return broker, recorded, parked


def ref() -> CheckpointRef:
    return CheckpointRef(kind="best", uri="s3://internal/checkpoints/t/best.pt", sha256="0" * 64)


TRAIN = StartTraining(
    job_id="t1", attempt=1, project_id="p", experiment_name="e",
    config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                          dataset_id="d", epochs=1),
    dataset=DatasetRef(dataset_id="d", content_hash="c0ffee"),
)
EXPORT = StartExport(job_id="x1", attempt=1, training_job_id="t1", export_format="onnx", checkpoint=ref(),
                     framework="pytorch", model_name="simple_cnn", task_type="image_classification")
INFER = StartInference(job_id="i1", attempt=1, training_job_id="t1", checkpoint=ref(), framework="pytorch",
                       model_name="simple_cnn", task_type="image_classification", inference_type="single",
                       image_uris=["s3://external/uploads/s/a.png"])


async def test_each_command_reaches_its_use_case_by_subject() -> None:
    broker, recorded, parked = runner_broker()
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(TRAIN.to_bytes(), subjects.CMD_TRAIN)
        await test_broker.publish(EXPORT.to_bytes(), subjects.CMD_EXPORT)
        await test_broker.publish(INFER.to_bytes(), subjects.CMD_INFER)
        admitted = TRAIN.model_copy(update={"job_id": "t2", "attempt": 2})
        await test_broker.publish(admitted.to_bytes(), subjects.admitted_train("t2", 2, gpus=0))
    assert [(kind, command) for kind, command, _ in recorded.ran] == [
        ("train", TRAIN), ("export", EXPORT), ("infer", INFER), ("train", admitted)
    ]
    assert parked.reasons == []


async def test_an_invalid_command_is_dead_lettered_naming_the_field_and_never_run() -> None:
    broker, recorded, parked = runner_broker()
    async with TestNatsBroker(broker) as test_broker:
        bad_export = EXPORT.model_dump(mode="json") | {"export_format": "tflite"}
        await test_broker.publish(bad_export, subjects.CMD_EXPORT)
        await test_broker.publish({"job_id": "t9", "attempt": 1}, subjects.CMD_TRAIN)
    assert recorded.ran == []
    assert [subject for subject, _ in parked.reasons] == [subjects.CMD_EXPORT, subjects.CMD_TRAIN]
    assert "export_format" in parked.reasons[0][1] and "config" in parked.reasons[1][1]


def test_the_subscriber_is_in_the_platforms_asyncapi_document() -> None:
    broker, _, _ = runner_broker()
    assert undocumented(broker) == []


class Settled:
    """A delivered command that notes how it was settled."""

    subject, reply, headers = subjects.CMD_EXPORT, "", None

    def __init__(self, delivered: int = 1) -> None:
        self.metadata = SimpleNamespace(num_delivered=delivered)
        self.settled: list[str] = []

    async def in_progress(self) -> None:
        return None

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def term(self) -> None:
        self.settled.append("term")


async def finished_with(outcome: AttemptOutcome | Exception) -> AttemptOutcome:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@pytest.mark.parametrize(("outcome", "lost", "expected"), [
    (AttemptOutcome.FINISHED, False, ["ack"]),
    (AttemptOutcome.REQUEUE, False, ["nak"]),  # shutdown: handed back so another runner takes it now
    # Lost: JetStream redelivers on its own; a nak of the stale delivery would deliver the job once more.
    (AttemptOutcome.REQUEUE, True, []),
    (AttemptOutcome.LEFT, False, []),  # stopped for a redelivery of its command held here since
    (AttemptOutcome.FINISHED, True, ["ack"]),  # its terminal event is stored: no one need run it again
    (TransientError("events stream away"), False, ["nak"]),  # nak'ed with backoff
    (TransientError("events stream away"), True, []),  # failed while lost: the redelivery retries it
])
async def test_a_held_command_is_settled_by_its_outcome_and_a_lost_one_is_left_to_redelivery(
    outcome: AttemptOutcome | Exception, lost: bool, expected: list[str]
) -> None:
    msg = Settled()
    async with HeldMessage(msg, spec=streams.RUNNER, heartbeat_seconds=20) as held:  # type: ignore[arg-type]
        if lost:
            held.lost.set()
        await _run_and_settle(held, finished_with(outcome), job_id="x1")
    assert msg.settled == expected and held.left == (expected == [])
