"""`/api/v1/export` against a real nats-server: validation, versions and the default, projection of
export events, download, cancel."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from visionyard.api.db.models_exports import ExportJob
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import StartExport
from visionyard.shared.events import (
    ExportCancelled,
    ExportCompleted,
    ExportFailed,
    ExportPackageStored,
    ExportProgress,
    ExportStarted,
    ExportStatusChanged,
    FailureReason,
)

from ..conftest import until
from ..export_inference_world import (
    EXPORTS,
    completed_training_job,
    count_rows,
    install_export_predict_manifest,
    kv_cancel_entry,
    stream_messages,
    training_job,
)

pytestmark = pytest.mark.integration


async def _export(client: httpx.AsyncClient, training_job_id: int, **body: Any) -> dict[str, Any]:
    created = await client.post(f"{EXPORTS}/jobs", json={"training_job_id": training_job_id, "export_format": "onnx",
                                                          **body})
    assert created.status_code == 201, created.text
    return dict(created.json())


async def _status(client: httpx.AsyncClient, export_id: int, wanted: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = (await client.get(f"{EXPORTS}/jobs/{export_id}")).json()
        return body if body["status"] == wanted else None

    return dict(await until(reached))


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"export_format": "tensorrt"}, 422, "export_format"),
    ({"export_config": {"opset_version": 5}}, 422, "export_config.opset_version"),
    ({"export_config": {"fp16": True}}, 422, "export_config.fp16"),
    ({"validation_config": {"tolerance": 0}}, 422, "validation_config.tolerance"),
    ({"checkpoint_path": "file:///elsewhere/best.pt"}, 404, "checkpoint_path"),
    ({"checkpoint_path": "last"}, 404, "checkpoint_path"),
    ({"checkpoint_path": "pretrained"}, 422, "checkpoint_path"),
])
async def test_invalid_export_is_refused_naming_the_field_and_leaves_no_row(
    client: httpx.AsyncClient, bus: Bus, body: dict[str, Any], status: int, names: str
) -> None:
    await install_export_predict_manifest(bus)
    training_job_id, _ = await completed_training_job(client, bus)
    refused = await client.post(f"{EXPORTS}/jobs",
                                json={"training_job_id": training_job_id, "export_format": "onnx", **body})
    assert refused.status_code == status, refused.text
    assert refused.json()["detail"].startswith(names)
    assert count_rows(client, ExportJob) == 0
    assert await stream_messages(bus, "COMMANDS", subjects.CMD_EXPORT) == []


async def test_export_of_an_unknown_or_unfinished_training_job_is_refused(client: httpx.AsyncClient, bus: Bus) -> None:
    await install_export_predict_manifest(bus)
    missing = await client.post(f"{EXPORTS}/jobs", json={"training_job_id": 999999, "export_format": "onnx"})
    assert missing.status_code == 404 and missing.json()["detail"].startswith("training_job_id")
    not_an_id = await client.post(f"{EXPORTS}/jobs", json={"training_job_id": "nope", "export_format": "onnx"})
    assert not_an_id.status_code == 422 and not_an_id.json()["detail"].startswith("training_job_id")
    queued = await training_job(client, bus)
    refused = await client.post(f"{EXPORTS}/jobs", json={"training_job_id": queued, "export_format": "onnx"})
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"training_job_id: training job {queued} is not completed: status is queued"
    assert count_rows(client, ExportJob) == 0


async def test_versions_count_up_and_only_one_export_is_the_default(client: httpx.AsyncClient, bus: Bus) -> None:
    await install_export_predict_manifest(bus)
    training_job_id, checkpoint_uri = await completed_training_job(client, bus)
    first = await _export(client, training_job_id)
    second = await _export(client, training_job_id, export_format="torchscript")
    assert (first["version"], first["is_default"], first["status"]) == (1, True, "pending")
    assert first["checkpoint_path"] == checkpoint_uri
    assert (second["version"], second["is_default"]) == (2, False)  # the first export stays the default
    third = await _export(client, training_job_id, set_as_default=True, export_config={"opset_version": 13})
    assert (third["version"], third["is_default"]) == (3, True)

    listed = (await client.get(f"{EXPORTS}/training/{training_job_id}/exports")).json()
    assert listed["total"] == 3
    assert [(e["version"], e["is_default"]) for e in listed["export_jobs"]] == [(3, True), (2, False), (1, False)]
    assert listed["exports"] == listed["export_jobs"]  # the older name stays for Visionyard's own clients

    async def three_commands() -> list[StartExport] | None:
        found = [StartExport.model_validate_json(data)
                 for _, data in await stream_messages(bus, "COMMANDS", subjects.CMD_EXPORT)]
        return found if len(found) == 3 else None

    # Commands carry the internal ids (the integers' decimal strings).
    commands = {int(command.job_id): command for command in await until(three_commands)}
    assert commands[third["id"]].export_config.opset_version == 13
    assert commands[second["id"]].export_format == "torchscript"
    assert commands[first["id"]].checkpoint.uri == checkpoint_uri
    assert (await client.get(f"{EXPORTS}/training/999999/exports")).status_code == 404


async def test_events_complete_an_export_only_once_its_package_is_stored(client: httpx.AsyncClient, bus: Bus) -> None:
    await install_export_predict_manifest(bus)
    training_job_id, _ = await completed_training_job(client, bus)
    export = await _export(client, training_job_id)
    export_id = export["id"]
    refused = await client.get(f"{EXPORTS}/{export_id}/download")
    assert refused.status_code == 409 and refused.json()["detail"].endswith("status is pending")

    stamp = {"job_id": str(export_id), "attempt": 1, "training_job_id": str(training_job_id)}
    await bus.publish(ExportStarted(**stamp, seq=1, runner_id="r1", pid=42))
    await bus.publish(ExportProgress(**stamp, seq=2, message="exporting"))
    await _status(client, export_id, "running")
    results = {"validation_passed": True, "max_abs_diff": 1e-6, "input_shape": [1, 1, 8, 8]}
    await bus.publish(ExportCompleted(**stamp, seq=4, results=results))

    async def exporter_done() -> bool:
        body = (await client.get(f"{EXPORTS}/jobs/{export_id}")).json()
        return body["export_results"] is not None

    await until(exporter_done)
    running = (await client.get(f"{EXPORTS}/jobs/{export_id}")).json()
    assert running["status"] == "running" and running["validation_passed"] is True  # the package is not stored yet
    assert (await client.get(f"{EXPORTS}/{export_id}/download")).status_code == 409

    uri = f"file:///store/exports/{export_id}/package.zip"
    await bus.publish(ExportPackageStored(**stamp, seq=3, uri=uri, sha256="c" * 64, size_bytes=2 * 1024 * 1024))
    done = await _status(client, export_id, "completed")
    assert done["export_path"] == uri and done["file_size_mb"] == 2.0
    assert done["export_results"] == results and done["completed_at"] is not None
    download = (await client.get(f"{EXPORTS}/{export_id}/download")).json()
    # A browser opens the link without headers: it carries a ticket for this package.
    package_url, _, query = download["download_url"].partition("?")
    assert package_url.endswith(f"/api/v1/export/{export_id}/package") and query.startswith("ticket=")
    assert (download["sha256"], download["file_size_mb"]) == ("c" * 64, 2.0)

    async def announced() -> list[str] | None:
        changes = [ExportStatusChanged.model_validate_json(data)
                   for _, data in await stream_messages(bus, "EVENTS", subjects.job_event(str(training_job_id),
                                                                                         "export_status"))]
        statuses = [change.new_status for change in changes if change.export_job_id == str(export_id)]
        return statuses if "completed" in statuses else None

    assert await until(announced) == ["running", "completed"]


async def test_a_failed_export_shows_the_classified_reason(client: httpx.AsyncClient, bus: Bus) -> None:
    await install_export_predict_manifest(bus)
    training_job_id, _ = await completed_training_job(client, bus)
    export_id = (await _export(client, training_job_id))["id"]
    stamp = {"job_id": str(export_id), "attempt": 1, "training_job_id": str(training_job_id)}
    await bus.publish(ExportStarted(**stamp, seq=1, runner_id="r1"))
    await bus.publish(ExportFailed(**stamp, seq=2, reason=FailureReason.TRAINER_CRASH,
                                   error_message="the trainer was killed by signal SIGKILL", exit_code=-9))
    failed = await _status(client, export_id, "failed")
    assert failed["error_message"] == "trainer_crash: the trainer was killed by signal SIGKILL"
    assert failed["validation_passed"] is None and failed["export_path"] is None
    assert (await client.get(f"{EXPORTS}/{export_id}/download")).json()["detail"].endswith("status is failed")


async def test_cancel_records_the_request_and_the_runner_confirms(client: httpx.AsyncClient, bus: Bus) -> None:
    await install_export_predict_manifest(bus)
    training_job_id, _ = await completed_training_job(client, bus)

    pending = (await _export(client, training_job_id))["id"]
    cancelled = await client.post(f"{EXPORTS}/jobs/{pending}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert await until(lambda: kv_cancel_entry(bus, pending)) == {"attempt": 1}
    again = await client.post(f"{EXPORTS}/jobs/{pending}/cancel")
    assert again.status_code == 409
    assert again.json()["detail"] == f"export_job_id: cannot cancel export {pending}: status is cancelled"

    running = (await _export(client, training_job_id))["id"]
    stamp = {"job_id": str(running), "attempt": 1, "training_job_id": str(training_job_id)}
    await bus.publish(ExportStarted(**stamp, seq=1, runner_id="r1"))
    await _status(client, running, "running")
    assert (await client.post(f"{EXPORTS}/jobs/{running}/cancel")).json()["status"] == "cancelling"
    assert await until(lambda: kv_cancel_entry(bus, running)) == {"attempt": 1}
    await bus.publish(ExportCancelled(**stamp, seq=2))
    await _status(client, running, "cancelled")
    # A runner that finished just before the cancel reached it changes nothing any more.
    await bus.publish(ExportPackageStored(**stamp, seq=3, uri="file:///p.zip", sha256="d" * 64, size_bytes=10))
    await bus.publish(ExportCompleted(**stamp, seq=4, results={"validation_passed": True}))
    late = (await _export(client, training_job_id))["id"]  # its projection follows the events above
    await bus.publish(ExportStarted(job_id=str(late), attempt=1, training_job_id=str(training_job_id), seq=1,
                                    runner_id="r1"))
    await _status(client, late, "running")
    assert (await client.get(f"{EXPORTS}/jobs/{running}")).json()["status"] == "cancelled"
    assert (await client.post(f"{EXPORTS}/jobs/999999/cancel")).status_code == 404
