"""What the export and inference API tests share: a classifier manifest that offers export and predict, a completed
training job with a stored `best` checkpoint (driven through the real projector by published events),
a fake storage answering `storage.keep_upload`, and readers of the database and the streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from faststream.nats.annotations import NatsMessage
from sqlalchemy import func, select

from visionyard.api.db.models_exports import ExportJob, InferenceJob, InferenceUpload
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, consumer
from visionyard.shared.commands import DeleteUploads, StartInference
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetReady,
    FailureReason,
    InferenceCompleted,
    InferenceFailed,
    InferenceStarted,
    JobCompleted,
    JobStarted,
)
from visionyard.shared.requests import KeepUploadReply, KeepUploadRequest

from .conftest import CLASSIFIER, FakeServices, until

JOBS = "/api/v1/training/jobs"
EXPORTS = "/api/v1/export"
INFERENCE = "/api/v1/test_inference/inference"

EXPORT_PREDICT_CLASSIFIER = CLASSIFIER.model_copy(update={
    "export_module": "visionyard.trainers.classifier.export",
    "predict_module": "visionyard.trainers.classifier.predict",
    "export_formats": ["onnx", "torchscript"],
})

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


async def install_export_predict_manifest(bus: Bus) -> None:
    """Publish a classifier manifest that offers export and predict (as a runner would)."""
    kv = await bus.kv(streams.KV_CAPABILITIES)
    await kv.put(EXPORT_PREDICT_CLASSIFIER.name, EXPORT_PREDICT_CLASSIFIER.model_dump_json().encode())


async def training_job(client: httpx.AsyncClient, bus: Bus, *, start: bool = True) -> int:
    """A training job on a ready dataset: `queued` (start) or `pending`; its integer id (the wire's)."""
    created = await client.post("/api/v1/datasets", json={"name": "digits", "visibility": "private"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["dataset_id"]
    await bus.publish(DatasetReady(
        dataset_id=dataset_id, content_hash="hash-1", format="imagefolder", num_images=100, num_classes=3,
        class_names=["0", "1", "2"], size_bytes=4096, uri="file:///d.zip",
    ))

    async def is_ready() -> bool:
        return (await client.get(f"/api/v1/datasets/{dataset_id}")).json()["status"] == "ready"

    await until(is_ready)
    body = {"config": {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
                       "dataset_id": dataset_id, "epochs": 1}}
    job = await client.post(JOBS, json=body)
    assert job.status_code == 201, job.text
    job_id: int = job.json()["id"]
    if start:
        assert (await client.post(f"{JOBS}/{job_id}/start")).status_code == 200
    return job_id


async def completed_training_job(client: httpx.AsyncClient, bus: Bus) -> tuple[int, str]:
    """A training job the projector shows `completed` with a stored `best` checkpoint: (id, checkpoint uri)."""
    job_id = await training_job(client, bus)
    internal_id = str(job_id)  # events carry the internal id: the integer's decimal string
    uri = f"file:///store/checkpoints/{job_id}/best.pt"
    for event in (
        JobStarted(job_id=internal_id, attempt=1, seq=1, runner_id="r1"),
        CheckpointStaged(job_id=internal_id, attempt=1, seq=2, checkpoint_kind="best", object_name=f"ckpt/{job_id}/best.pt",
                         sha256="b" * 64, size_bytes=12, epoch=1),
        JobCompleted(job_id=internal_id, attempt=1, seq=3, total_epochs_completed=1, final_metrics={"accuracy": 0.9},
                     declared_checkpoints=["best"]),
        ArtifactStored(job_id=internal_id, attempt=1, seq=2, checkpoint_kind="best", uri=uri, sha256="b" * 64,
                       size_bytes=12, epoch=1),
    ):
        await bus.publish(event)

    async def completed() -> bool:
        return (await client.get(f"{JOBS}/{job_id}")).json()["status"] == "completed"

    await until(completed)
    return job_id, uri


async def serve_keep_upload(fakes: FakeServices, kept: list[KeepUploadRequest]) -> None:
    """A fake storage that keeps every staged upload under `file:///store/uploads/<session>/<name>`."""

    async def keep(request: KeepUploadRequest) -> KeepUploadReply:
        kept.append(request)
        key = f"uploads/{request.session_id}/{len(kept):03d}-{request.filename}"
        return KeepUploadReply(ok=True, uri=f"file:///store/{key}", key=key)

    await fakes.answer("storage", {subjects.STORAGE_KEEP_UPLOAD: keep})


def count_rows(client: httpx.AsyncClient, model: type[ExportJob] | type[InferenceJob] | type[InferenceUpload]) -> int:
    """How many rows of `model` the API's database holds."""
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


async def stream_messages(bus: Bus, stream: str, subject_prefix: str) -> list[tuple[str, bytes]]:
    """Every stored message of `stream` whose subject starts with `subject_prefix` (read directly)."""
    info = await bus.js.stream_info(stream)
    found: list[tuple[str, bytes]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except Exception:  # acked from the work queue, or expired
            continue
        if msg.subject.startswith(subject_prefix) and msg.data is not None:
            found.append((msg.subject, msg.data))
    return found


async def released_uploads(bus: Bus, count: int) -> list[DeleteUploads]:
    """The `cmd.upload.delete` commands in the stream, once there are `count` (the relay publishes after commit)."""

    async def published() -> list[DeleteUploads] | None:
        found = [DeleteUploads.model_validate_json(data)
                 for _, data in await stream_messages(bus, streams.COMMANDS.name, subjects.CMD_UPLOAD_DELETE)]
        return found if len(found) >= count else None

    result: list[DeleteUploads] = await until(published)
    return result


async def kv_cancel_entry(bus: Bus, key: int | str) -> dict[str, Any] | None:
    """The `job_cancellations` entry for job `key` (keyed by the internal id, the decimal string), if any."""
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    try:
        entry = await kv.get(str(key))
    except Exception:
        return None
    return json.loads(entry.value) if entry.value else None


async def stage_results(bus: Bus, tmp_path: Path, rows: list[dict[str, Any]], *, name: str) -> tuple[str, str]:
    """Put a predictor's results document into the staging object store: (object name, sha256)."""
    total_ms = sum(row.get("inference_time_ms") or 0.0 for row in rows)
    document = {"summary": {"total_images": len(rows), "total_inference_time_ms": total_ms,
                            "avg_inference_time_ms": total_ms / len(rows) if rows else None},
                "results": rows}
    path = tmp_path / f"{name.replace('/', '_')}.json"
    path.write_text(json.dumps(document))
    sha256, _ = await bus.put_file(name, path)
    return name, sha256


def classify_as(label: str, label_id: int, confidence: float = 0.8) -> Callable[[StartInference], list[dict[str, Any]]]:
    """A predictor's answer: every image of the command classified as `label`."""

    def answer(command: StartInference) -> list[dict[str, Any]]:
        return [{"image_name": uri.rsplit("/", 1)[-1], "predicted_label": label, "predicted_label_id": label_id,
                 "confidence": confidence, "top5_predictions": [{"label": label, "label_id": label_id,
                                                                 "confidence": confidence}],
                 "predicted_boxes": None, "inference_time_ms": 3.5} for uri in command.image_uris]

    return answer


@asynccontextmanager
async def runner_answering(bus: Bus, tmp_path: Path, answer: Callable[[StartInference], list[dict[str, Any]]] | None,
                           *, fail: str | None = None) -> AsyncIterator[list[StartInference]]:
    """A runner's inference part: pulls `cmd.infer` from the runners' consumer and publishes what a predictor's run
    publishes (started, results staged in the object store, completed; or failed). Yields the commands it ran."""
    ran: list[StartInference] = []
    broker = attached(bus, service="runner")

    @consumer(broker, streams.RUNNER)
    async def on_command(message: NatsMessage) -> None:
        msg = message.raw_message
        if msg.subject != subjects.CMD_INFER:
            return  # a training or export command of the same consumer: not this runner's part
        command = StartInference.model_validate_json(msg.data)
        ran.append(command)
        stamp = {"job_id": command.job_id, "attempt": command.attempt, "training_job_id": command.training_job_id}
        await bus.publish(InferenceStarted(**stamp, seq=1, runner_id="fake-runner"))
        if fail is not None or answer is None:
            await bus.publish(InferenceFailed(**stamp, seq=2, reason=FailureReason.TRAINER_CRASH,
                                              error_message=fail or "no answer"))
            return
        name, sha256 = await stage_results(bus, tmp_path, answer(command),
                                           name=f"results/{command.job_id}/{command.attempt}/results.json")
        await bus.publish(InferenceCompleted(**stamp, seq=2, results={}, results_object=name, results_sha256=sha256))

    await broker.start()
    try:
        yield ran
    finally:
        await broker.stop()
