"""The REST API against a real nats-server: outbox to JetStream, projector from EVENTS, uploads, errors."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import httpx
import pytest

from visionyard.api.config import ApiSettings
from visionyard.api.main import create_app
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import IngestDataset, StartTraining
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetReady,
    JobCompleted,
    JobStarted,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.requests import TrackerQuery
from visionyard.shared.scheduling import QueueRequest

from .conftest import FakeServices, until

pytestmark = pytest.mark.integration

JOBS = "/api/v1/training/jobs"


async def _stream_messages(bus: Bus, stream: str, subject: str) -> list[tuple[str, bytes]]:
    """Every stored message of `stream` on `subject`, read directly (no consumer: COMMANDS is a work queue)."""
    info = await bus.js.stream_info(stream)
    found: list[tuple[str, bytes]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except Exception:  # deleted (acked from the work queue) or expired
            continue
        if msg.subject == subject and msg.data is not None:
            found.append((msg.subject, msg.data))
    return found


async def _queued_requests(bus: Bus, job_id: str) -> list[QueueRequest]:
    """Every queue request the API put for a job (`sched_requests`, in order): what `start` queues for the scheduler."""
    return [QueueRequest.model_validate_json(data)
            for _, data in await _stream_messages(bus, f"KV_{streams.KV_SCHED_REQUESTS}",
                                                  subjects.kv_put(streams.KV_SCHED_REQUESTS, job_id)) if data]


async def _ready_dataset(client: httpx.AsyncClient, bus: Bus, *, content_hash: str = "hash-1") -> str:
    created = await client.post("/api/v1/datasets", json={"name": "digits", "visibility": "private"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["dataset_id"]
    await bus.publish(DatasetReady(
        dataset_id=dataset_id, content_hash=content_hash, format="imagefolder", num_images=100, num_classes=10,
        class_names=[str(i) for i in range(10)], size_bytes=4096, uri="file:///d.zip",
    ))

    async def is_ready() -> bool:
        return (await client.get(f"/api/v1/datasets/{dataset_id}")).json()["status"] == "ready"

    await until(is_ready)
    return dataset_id


def _job_body(dataset_id: str, **config: Any) -> dict[str, Any]:
    return {"config": {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
                       "dataset_id": dataset_id, "epochs": 2, **config}}


async def test_create_list_get_start_publishes_the_command_and_the_queued_event(
    client: httpx.AsyncClient, bus: Bus
) -> None:
    dataset_id = await _ready_dataset(client, bus)
    created = await client.post(JOBS, json=_job_body(dataset_id))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "pending" and job["task_type"] == "image_classification"
    assert (job["num_classes"], job["dataset_snapshot_id"]) == (10, "hash-1")
    # Integer ids on the wire; without a project_id the job lands in the caller's own default project.
    assert isinstance(job["id"], int) and isinstance(job["project_id"], int)
    assert (job["primary_metric"], job["primary_metric_mode"]) == ("accuracy", "max")
    assert job["project_name"] == "Uncategorized"
    assert job["experiment_name"] == f"visionyard-{job['project_id']}"

    listed = (await client.get(JOBS, params={"project_id": job["project_id"]})).json()
    assert listed["total"] == 1 and listed["jobs"][0]["id"] == job["id"]
    assert (await client.get(f"{JOBS}/{job['id']}")).json()["id"] == job["id"]

    started = await client.post(f"{JOBS}/{job['id']}/start")
    assert started.status_code == 200 and started.json()["status"] == "queued"

    async def request_landed() -> list[QueueRequest]:
        return await _queued_requests(bus, str(job["id"]))

    requests = await until(request_landed)
    assert (requests[0].attempt, requests[0].project_id, requests[0].priority, requests[0].gpus) == (
        1, str(job["project_id"]), 50, 0)
    command = requests[0].command
    assert (command.job_id, command.attempt, command.dataset.content_hash) == (str(job["id"]), 1, "hash-1")
    assert command.config.task_type == "image_classification" and command.config.epochs == 2

    async def queued_landed() -> list[tuple[str, bytes]]:
        return await _stream_messages(bus, "EVENTS", subjects.job_event(str(job["id"]), "queued"))

    assert await until(queued_landed)

    # The original frontend calls start on a job already queued (after restart): it answers the job as is,
    # and queues nothing more.
    again = await client.post(f"{JOBS}/{job['id']}/start")
    assert again.status_code == 200, again.text
    assert (again.json()["status"], again.json()["attempt"]) == ("queued", 1)
    relay = client.app.state.relay  # type: ignore[attr-defined]
    assert relay.count_backlog() == 0  # nothing was added to the outbox by the second start
    assert len(await _queued_requests(bus, str(job["id"]))) == 1


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"epochs": 0}, "config.epochs"),
        ({"batch_size": 513}, "config.batch_size"),
        ({"learning_rate": 1.5}, "config.learning_rate"),
        ({"framework": "jax"}, "config.framework"),
        ({"model_name": "resnet9000"}, "config.model_name"),
        ({"task_type": "segmentation"}, "config.task_type"),
        ({"dataset_format": "yolo"}, "config.dataset_format"),
    ],
)
async def test_invalid_job_is_refused_naming_the_field_and_leaves_no_row(
    client: httpx.AsyncClient, bus: Bus, config: dict[str, Any], field: str
) -> None:
    dataset_id = await _ready_dataset(client, bus)
    refused = await client.post(JOBS, json=_job_body(dataset_id, **config))
    assert refused.status_code == 422
    assert field in refused.json()["detail"]
    if field == "config.framework":
        assert "pytorch" in refused.json()["detail"]  # lists the valid choices
    assert (await client.get(JOBS)).json()["total"] == 0


async def test_unknown_dataset_is_404_and_unready_dataset_is_409(client: httpx.AsyncClient) -> None:
    assert (await client.post(JOBS, json=_job_body("missing"))).status_code == 404
    created = (await client.post("/api/v1/datasets", json={"name": "empty", "visibility": "public"})).json()
    refused = await client.post(JOBS, json=_job_body(created["dataset_id"]))
    assert refused.status_code == 409 and "not ready" in refused.json()["detail"]


async def test_cancelling_a_queued_job_records_the_cancel_in_kv(client: httpx.AsyncClient, bus: Bus) -> None:
    dataset_id = await _ready_dataset(client, bus)
    job_id = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    await client.post(f"{JOBS}/{job_id}/start")
    cancelled = await client.post(f"{JOBS}/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    kv = await bus.kv(streams.KV_CANCELLATIONS)

    async def entry() -> Any:
        try:
            return await kv.get(str(job_id))  # the KV key is the internal id: the decimal string
        except Exception:
            return None

    record = await until(entry)
    assert json.loads(record.value) == {"attempt": 1}
    assert (await client.post(f"{JOBS}/{job_id}/cancel")).status_code == 409
    restarted = await client.post(f"{JOBS}/{job_id}/restart")
    assert restarted.json()["status"] == "queued" and restarted.json()["attempt"] == 2


async def test_projector_applies_a_run_with_duplicates_and_completes_only_when_stored(
    client: httpx.AsyncClient, bus: Bus
) -> None:
    dataset_id = await _ready_dataset(client, bus)
    job_id = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    await client.post(f"{JOBS}/{job_id}/start")
    internal_id = str(job_id)  # events carry the internal id, the REST paths the integer
    progress = ProgressReported(job_id=internal_id, attempt=1, seq=2, epoch=1, total_epochs=2,
                                metrics={"loss": 0.7, "accuracy": 0.6, "train_loss": 0.8})
    run = [
        JobStarted(job_id=internal_id, attempt=1, seq=1, runner_id="r1"),
        progress,
        LogEmitted(job_id=internal_id, attempt=1, seq=3, message="hello", event_type="stdout"),
        ProgressReported(job_id=internal_id, attempt=1, seq=4, epoch=2, total_epochs=2, metrics={"loss": 0.3, "accuracy": 0.95}),
        CheckpointStaged(job_id=internal_id, attempt=1, seq=5, checkpoint_kind="best", object_name="ckpt/x/1/5-best.pt",
                         sha256="b" * 64, size_bytes=12, epoch=2),
        JobCompleted(job_id=internal_id, attempt=1, seq=6, total_epochs_completed=2, final_metrics={"accuracy": 0.95},
                     best_metrics={"accuracy": 0.95}, best_epoch=2, declared_checkpoints=["best"]),
    ]
    for event in run:
        await bus.publish(event)
    # A redelivered event under a new message id (as a runner retry after a lost PubAck could do).
    await bus.publish(progress.model_copy(update={"message_id": "dup-progress"}))

    async def finished_epochs() -> bool:
        body = (await client.get(f"{JOBS}/{job_id}")).json()
        return body["current_epoch"] == 2 and body["final_accuracy"] == 0.95

    await until(finished_epochs)
    assert (await client.get(f"{JOBS}/{job_id}")).json()["status"] == "running"  # best not stored yet

    await bus.publish(ArtifactStored(job_id=internal_id, attempt=1, seq=5, checkpoint_kind="best",
                                     uri="file:///store/best.pt", sha256="b" * 64, size_bytes=12, epoch=2))

    async def completed() -> dict[str, Any] | None:
        body = (await client.get(f"{JOBS}/{job_id}")).json()
        return body if body["status"] == "completed" else None

    job = await until(completed)
    assert job["best_checkpoint_path"] == "file:///store/best.pt" and job["progress_percent"] == 100.0
    metrics = (await client.get(f"{JOBS}/{job_id}/metrics")).json()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0]["extra_metrics"] == {"train_loss": 0.8}
    status = (await client.get(f"{JOBS}/{job_id}/status")).json()
    assert len(status["latest_metrics"]) == 2
    logs = (await client.get(f"{JOBS}/{job_id}/logs", params={"log_type": "stdout"})).json()
    assert [(entry["log_type"], entry["content"], entry["message"]) for entry in logs] == [("stdout", "hello", "hello")]
    checkpoints = (await client.get(f"{JOBS}/{job_id}/checkpoints")).json()["checkpoints"]
    assert checkpoints == [{"kind": "best", "uri": "file:///store/best.pt", "sha256": "b" * 64, "size_bytes": 12, "epoch": 2}]
    schema = (await client.get(f"{JOBS}/{job_id}/metric-schema")).json()
    assert schema["available_metrics"] == ["accuracy", "loss", "train_loss"] and schema["metric_count"] == 2
    resumed = await client.post(f"{JOBS}/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["attempt"] == 2

    async def resume_command() -> StartTraining | None:
        for request in await _queued_requests(bus, str(job_id)):
            if request.attempt == 2:
                return request.command
        return None

    command = await until(resume_command)
    assert command.resume_from is not None and command.resume_from.uri == "file:///store/best.pt"


async def test_no_http_route_lets_a_caller_report_for_a_trainer(client: httpx.AsyncClient, bus: Bus) -> None:
    """Trainers report only through their runner's pipe: a forged completion has nowhere to go and changes nothing."""
    dataset_id = await _ready_dataset(client, bus)
    job_id = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    await client.post(f"{JOBS}/{job_id}/start")
    for kind, body in (("completion", {"status": "completed", "total_epochs_completed": 2}),
                       ("progress", {"current_epoch": 1, "total_epochs": 2}), ("logs", {"message": "forged"})):
        forged = await client.post(f"{JOBS}/{job_id}/callback/{kind}", json={"job_id": job_id, **body})
        assert forged.status_code in (404, 405), (kind, forged.status_code)
    job = (await client.get(f"{JOBS}/{job_id}")).json()
    assert job["status"] == "queued" and job["current_epoch"] == 0
    assert (await client.get(f"{JOBS}/{job_id}/logs", params={"log_type": "log"})).json() == []


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cats/1.png", b"not really a png")
    return buffer.getvalue()


async def test_upload_stages_the_archive_and_asks_storage_to_ingest_it(client: httpx.AsyncClient, bus: Bus) -> None:
    dataset_id = (await client.post("/api/v1/datasets", json={"name": "pets", "visibility": "private"})).json()["dataset_id"]
    payload = _zip_bytes()
    accepted = await client.post(f"/api/v1/datasets/{dataset_id}/upload",
                                 files={"file": ("pets.zip", payload, "application/zip")})
    assert accepted.status_code == 202, accepted.text
    object_name = accepted.json()["object_name"]
    assert object_name.startswith(f"upload/{dataset_id}/") and await bus.has_object(object_name)
    assert (await client.get(f"/api/v1/datasets/{dataset_id}")).json()["status"] == "processing"

    async def ingest_command() -> list[tuple[str, bytes]]:
        return await _stream_messages(bus, "COMMANDS", subjects.CMD_DATASET_INGEST)

    command = IngestDataset.model_validate_json((await until(ingest_command))[0][1])
    assert (command.dataset_id, command.object_name, command.filename) == (dataset_id, object_name, "pets.zip")
    assert command.size_bytes == len(payload)

    raw = await client.post(f"/api/v1/datasets/{dataset_id}/upload", content=payload,
                            headers={"content-type": "application/zip"})
    assert raw.status_code == 202

    not_zip = await client.post(f"/api/v1/datasets/{dataset_id}/upload",
                                files={"file": ("pets.zip", b"GIF89a....", "application/zip")})
    assert not_zip.status_code == 422 and not_zip.json()["detail"].startswith("file:")


async def test_upload_over_the_limit_is_413(bus: Bus, settings: ApiSettings) -> None:
    small = settings.model_copy(update={"upload_max_bytes": 1000})
    app = create_app(small, bus=bus)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            dataset_id = (await http.post("/api/v1/datasets", json={"name": "big"})).json()["dataset_id"]
            refused = await http.post(f"/api/v1/datasets/{dataset_id}/upload", content=b"PK\x03\x04" + b"x" * 5000,
                                      headers={"content-type": "application/zip"})
            assert refused.status_code == 413
            assert (await http.get(f"/api/v1/datasets/{dataset_id}")).json()["status"] == "empty"


async def test_delete_dataset_refused_while_a_queued_job_uses_it(client: httpx.AsyncClient, bus: Bus) -> None:
    dataset_id = await _ready_dataset(client, bus)
    job_id = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    await client.post(f"{JOBS}/{job_id}/start")
    assert (await client.delete(f"/api/v1/datasets/{dataset_id}")).status_code == 409
    await client.post(f"{JOBS}/{job_id}/cancel")
    assert (await client.delete(f"/api/v1/datasets/{dataset_id}")).status_code == 200
    assert (await client.get(f"/api/v1/datasets/{dataset_id}")).status_code == 404


async def test_models_schema_health_and_tracker_outage(client: httpx.AsyncClient, bus: Bus,
                                                       fake_services: FakeServices) -> None:
    models = (await client.get("/api/v1/models/list", params={"task_type": "classification"})).json()
    assert {m["model_name"] for m in models} == {"simple_cnn", "tiny_resnet"}
    schema = (await client.get("/api/v1/training/config-schema", params={"framework": "pytorch"})).json()
    assert [(f["name"], f["type"]) for f in schema["fields"]] == [("epochs", "int")]
    assert (await client.get("/health/ready")).status_code == 200
    asyncapi = (await client.get("/asyncapi")).json()
    assert asyncapi == (await client.get("/asyncapi.json")).json()
    addresses = {channel["address"] for channel in asyncapi["channels"].values()}
    assert {"evt.job.{job_id}.progress", "cmd.train", "tracker.summary", "storage.stage"} <= addresses
    dataset_id = await _ready_dataset(client, bus)
    job_id = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    client.app.state.training._tracker._timeout = 0.2  # type: ignore[attr-defined]
    outage = await client.get(f"{JOBS}/{job_id}/mlflow/metrics")
    assert outage.status_code == 503 and "tracker" in outage.json()["detail"]

    async def tracker(query: TrackerQuery) -> dict[str, Any]:
        return {"found": True, "run_id": "r-1", "metrics": {"loss": []}}

    await fake_services.answer("tracker", {subjects.TRACKER_SUMMARY: tracker})
    summary = (await client.get(f"{JOBS}/{job_id}/mlflow/summary")).json()
    assert summary["run_id"] == "r-1" and summary["primary_metric"] == "accuracy" and summary["framework"] == "pytorch"
    exposition = (await client.get("/metrics")).text
    assert "visionyard_api_requests_total" in exposition and "visionyard_api_outbox_backlog" in exposition


async def test_api_keys_are_required_when_configured(bus: Bus, settings: ApiSettings) -> None:
    # Embedded mode lets calls without credentials act as the admin unless anonymous_as_admin is off.
    locked = settings.model_copy(update={"api_keys": ["s3cret"], "anonymous_as_admin": False})
    app = create_app(locked, bus=bus)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            assert (await http.get(JOBS)).status_code == 401
            assert (await http.get(JOBS, headers={"Authorization": "Bearer wrong"})).status_code == 401
            assert (await http.get(JOBS, headers={"Authorization": "Bearer s3cret"})).status_code == 200
            assert (await http.get(JOBS, headers={"X-API-Key": "s3cret"})).status_code == 200
            assert (await http.get("/health")).status_code == 200
