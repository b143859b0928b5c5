"""`/api/v1/test_inference` against a real nats-server: uploads, validation, projection of inference
events (results loaded from the staging object store), pagination, the per-training-job summary, cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.api.db.models_exports import InferenceJob, InferenceUpload
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import StartInference
from visionyard.shared.events import (
    FailureReason,
    InferenceCancelled,
    InferenceCompleted,
    InferenceFailed,
    InferenceStarted,
)
from visionyard.shared.requests import KeepUploadRequest

from ..conftest import FakeServices, until
from ..export_inference_world import (
    INFERENCE,
    PNG,
    completed_training_job,
    count_rows,
    kv_cancel_entry,
    serve_keep_upload,
    stage_results,
    stream_messages,
    training_job,
)

pytestmark = pytest.mark.integration


async def _upload(client: httpx.AsyncClient, names: list[str], training_job_id: int | None = None) -> dict[str, Any]:
    files = [("files", (name, PNG, "image/png")) for name in names]
    params = {"training_job_id": training_job_id} if training_job_id else {}
    uploaded = await client.post(f"{INFERENCE}/upload-images", files=files, params=params)
    assert uploaded.status_code == 200, uploaded.text
    return dict(uploaded.json())


async def _create(client: httpx.AsyncClient, training_job_id: int, uris: list[str], **body: Any) -> dict[str, Any]:
    created = await client.post(f"{INFERENCE}/jobs", json={
        "training_job_id": training_job_id, "inference_type": "batch", "input_data": {"image_paths_s3": uris}, **body,
    })
    assert created.status_code == 201, created.text
    return dict(created.json())


async def _status(client: httpx.AsyncClient, inference_id: int, wanted: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = (await client.get(f"{INFERENCE}/jobs/detail/{inference_id}")).json()
        return body if body["status"] == wanted else None

    return dict(await until(reached))


def _rows(count: int) -> list[dict[str, Any]]:
    return [{"image_name": f"img-{index}.png", "predicted_label": str(index % 3), "predicted_label_id": index % 3,
             "confidence": 0.5 + index / 100, "top5_predictions": [{"label": str(index % 3), "confidence": 0.5}],
             "predicted_boxes": None, "inference_time_ms": 2.0} for index in range(count)]


def _stamp(inference_id: int, training_job_id: int) -> dict[str, Any]:
    """The fields every inference event carries: the internal ids (the integers' decimal strings)."""
    return {"job_id": str(inference_id), "attempt": 1, "training_job_id": str(training_job_id)}


async def _complete(bus: Bus, tmp_path: Path, *, inference_id: int, training_job_id: int, rows: int) -> None:
    name, sha256 = await stage_results(bus, tmp_path, _rows(rows), name=f"results/{inference_id}/1/results.json")
    stamp = _stamp(inference_id, training_job_id)
    await bus.publish(InferenceStarted(**stamp, seq=1, runner_id="r1"))
    await bus.publish(InferenceCompleted(**stamp, seq=3, results={"model_name": "simple_cnn"}, results_object=name,
                                         results_sha256=sha256))


async def test_upload_keeps_images_and_refuses_a_non_image_naming_it(
    client: httpx.AsyncClient, bus: Bus, fake_services: FakeServices
) -> None:
    kept: list[KeepUploadRequest] = []
    await serve_keep_upload(fake_services, kept)
    files = [("files", ("seven.png", PNG, "image/png")), ("files", ("notes.txt", b"hello, not an image", "text/plain"))]
    refused = await client.post(f"{INFERENCE}/upload-images", files=files)
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("files: notes.txt is not an image")
    assert kept == [] and count_rows(client, InferenceUpload) == 0
    assert (await client.post(f"{INFERENCE}/upload-images", files=[("files", ("a.png", PNG))],
                              params={"training_job_id": 999999})).status_code == 404
    assert (await client.post(f"{INFERENCE}/upload-images", files=[("files", ("a.png", PNG))],
                              params={"training_job_id": "nope"})).status_code == 422

    uploaded = await _upload(client, ["seven.png", "eight.png"])
    assert uploaded["total_files"] == 2 and [f["original_filename"] for f in uploaded["uploaded_files"]] == [
        "seven.png", "eight.png"]
    assert all(f["s3_uri"].startswith(uploaded["s3_prefix"]) for f in uploaded["uploaded_files"])
    assert [request.filename for request in kept] == ["seven.png", "eight.png"]
    assert count_rows(client, InferenceUpload) == 2


async def test_invalid_inference_is_refused_naming_the_field_and_leaves_no_row(
    client: httpx.AsyncClient, bus: Bus, fake_services: FakeServices
) -> None:
    await serve_keep_upload(fake_services, [])
    training_job_id, _ = await completed_training_job(client, bus)
    uris = [f["s3_uri"] for f in (await _upload(client, ["a.png", "b.png"]))["uploaded_files"]]
    queued = await training_job(client, bus)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"training_job_id": 999999, "input_data": {"image_paths_s3": uris}}, 404, "training_job_id"),
        ({"training_job_id": "nope", "input_data": {"image_paths_s3": uris}}, 422, "training_job_id"),
        ({"training_job_id": queued, "input_data": {"image_paths_s3": uris}}, 409, "training_job_id"),
        ({"training_job_id": training_job_id, "checkpoint_path": "file:///x.pt", "input_data": {"image_paths_s3": uris}},
         404, "checkpoint_path"),
        ({"training_job_id": training_job_id, "input_data": {"image_paths_s3": [*uris, "file:///store/elsewhere.png"]}},
         422, "input_data.image_paths_s3: file:///store/elsewhere.png was not uploaded"),
        ({"training_job_id": training_job_id, "input_data": {"image_paths_s3": []}}, 422, "input_data.image_paths_s3"),
        ({"training_job_id": training_job_id, "inference_type": "single", "input_data": {"image_paths_s3": uris}},
         422, "input_data.image_paths_s3: a single inference takes 1 image"),
        ({"training_job_id": training_job_id, "inference_type": "video", "input_data": {"image_paths_s3": uris}},
         422, "inference_type"),
        ({"training_job_id": training_job_id, "input_data": {"image_paths_s3": uris, "confidence_threshold": 2}},
         422, "input_data.confidence_threshold"),
    ]
    for body, status, detail in cases:
        refused = await client.post(f"{INFERENCE}/jobs", json=body)
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["detail"].startswith(detail), (body, refused.text)
    assert count_rows(client, InferenceJob) == 0
    assert await stream_messages(bus, "COMMANDS", subjects.CMD_INFER) == []

    created = await _create(client, training_job_id, uris, input_data={"image_paths_s3": uris, "top_k": 3})
    assert (created["status"], created["inference_type"], created["task_type"]) == (
        "pending", "batch", "image_classification")

    async def command() -> list[tuple[str, bytes]]:
        return await stream_messages(bus, "COMMANDS", subjects.CMD_INFER)

    sent = StartInference.model_validate_json((await until(command))[0][1])
    assert (sent.job_id, sent.image_uris, sent.top_k, sent.checkpoint.kind) == (str(created["id"]), uris, 3, "best")


async def test_completed_results_are_paginated_and_summarised(
    client: httpx.AsyncClient, bus: Bus, fake_services: FakeServices, tmp_path: Path
) -> None:
    await serve_keep_upload(fake_services, [])
    training_job_id, _ = await completed_training_job(client, bus)
    uris = [f["s3_uri"] for f in (await _upload(client, ["a.png"]))["uploaded_files"]]
    first = (await _create(client, training_job_id, uris))["id"]
    second = (await _create(client, training_job_id, uris))["id"]
    broken = (await _create(client, training_job_id, uris))["id"]

    await _complete(bus, tmp_path, inference_id=first, training_job_id=training_job_id, rows=5)
    done = await _status(client, first, "completed")
    assert (done["total_images"], done["total_inference_time_ms"], done["avg_inference_time_ms"]) == (5, 10.0, 2.0)
    page = (await client.get(f"{INFERENCE}/jobs/{first}/results", params={"skip": 1, "limit": 2})).json()
    assert (page["total_count"], page["skip"], page["limit"]) == (5, 1, 2)
    assert [row["image_name"] for row in page["results"]] == ["img-1.png", "img-2.png"]
    assert page["results"][0]["predicted_label"] == "1" and page["results"][0]["top5_predictions"][0]["label"] == "1"
    tail = (await client.get(f"{INFERENCE}/jobs/{first}/results", params={"skip": 4, "limit": 10})).json()
    assert [row["image_name"] for row in tail["results"]] == ["img-4.png"]
    assert (await client.get(f"{INFERENCE}/jobs/{first}/results", params={"limit": 0})).status_code == 422
    assert (await client.get(f"{INFERENCE}/jobs/999999/results")).status_code == 404

    await _complete(bus, tmp_path, inference_id=second, training_job_id=training_job_id, rows=3)
    await _status(client, second, "completed")
    stamp = _stamp(broken, training_job_id)
    await bus.publish(InferenceFailed(**stamp, seq=1, reason=FailureReason.USER_ERROR, error_message="unreadable image"))
    failed = await _status(client, broken, "failed")
    assert failed["error_message"] == "user_error: unreadable image"

    summary = (await client.get(f"{INFERENCE}/jobs/{training_job_id}")).json()
    assert (summary["total"], summary["completed"], summary["total_images"]) == (3, 2, 8)
    assert summary["avg_inference_time_ms"] == 2.0
    assert {job["id"] for job in summary["jobs"]} == {first, second, broken}
    assert (await client.get(f"{INFERENCE}/jobs/999999")).status_code == 404


async def test_cancel_pending_and_running_inference_and_refuse_a_finished_one(
    client: httpx.AsyncClient, bus: Bus, fake_services: FakeServices, tmp_path: Path
) -> None:
    await serve_keep_upload(fake_services, [])
    training_job_id, _ = await completed_training_job(client, bus)
    uris = [f["s3_uri"] for f in (await _upload(client, ["a.png"]))["uploaded_files"]]

    pending = (await _create(client, training_job_id, uris))["id"]
    assert (await client.post(f"{INFERENCE}/jobs/{pending}/cancel")).json()["status"] == "cancelled"
    assert await until(lambda: kv_cancel_entry(bus, pending)) == {"attempt": 1}

    running = (await _create(client, training_job_id, uris))["id"]
    stamp = _stamp(running, training_job_id)
    await bus.publish(InferenceStarted(**stamp, seq=1, runner_id="r1"))
    await _status(client, running, "running")
    assert (await client.post(f"{INFERENCE}/jobs/{running}/cancel")).json()["status"] == "cancelling"
    await bus.publish(InferenceCancelled(**stamp, seq=2))
    cancelled = await _status(client, running, "cancelled")
    assert cancelled["completed_at"] is not None

    finished = (await _create(client, training_job_id, uris))["id"]
    await _complete(bus, tmp_path, inference_id=finished, training_job_id=training_job_id, rows=1)
    await _status(client, finished, "completed")
    refused = await client.post(f"{INFERENCE}/jobs/{finished}/cancel")
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"inference_job_id: cannot cancel inference job {finished}: status is completed"
    assert (await client.post(f"{INFERENCE}/jobs/999999/cancel")).status_code == 404
