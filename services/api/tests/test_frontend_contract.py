"""The original frontend's contract (/work/shared/frontend-contract.md): every call its pages make, with
the body they send, against the running API, asserting the fields and the types the pages read.

Calls are made as the page makes them: "auth" ones with the logged-in user's bearer token, "noauth" ones
(the training job page, the wizard's submit, test inference, the WebSocket) with no header at all,
which in embedded mode act as the admin. A wrong type here is a crash or a false error in the browser
(e.g. `format.toUpperCase()` on null, `logs.map` on an object), so the types are the contract.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from visionyard.api.config import ApiSettings
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import InferenceCompleted, InferenceStarted, LogEmitted, ProgressReported
from visionyard.shared.requests import (
    ImageEntry,
    ListImagesReply,
    ListImagesRequest,
    ReadImageReply,
    ReadImageRequest,
    TrackerQuery,
)

from .access_world import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    API,
    PASSWORD,
    PNG,
    World,
    cheap_password_hashing,
    completed_job,
    export_job,
    login,
    mark_export_completed,
    ready_dataset,
    world_of,
)
from .conftest import FakeServices, until
from .export_inference_world import (
    classify_as,
    install_export_predict_manifest,
    runner_answering,
    serve_keep_upload,
    stage_results,
)

pytestmark = pytest.mark.integration

UI = "admin"  # the frontend's logged-in user: embedded mode's admin (`visionyard up` prints its login)
NOAUTH = "anonymous"  # the page's calls that send no Authorization header


# -- types as the page reads them -------------------------------------------------------------------


def _kind_ok(value: Any, kind: str) -> bool:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        return optional
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "time":
        if not isinstance(value, str):
            return False
        datetime.fromisoformat(value)
        return True
    if kind == "any":
        return True
    return isinstance(value, {"str": str, "bool": bool, "list": list, "dict": dict}[kind])


def shape(value: Any, fields: dict[str, str], where: str) -> dict[str, Any]:
    """Assert `value` is an object whose `fields` have the kinds given ("int", "str?", "time", ...)."""
    assert isinstance(value, dict), f"{where}: wanted an object, got {type(value).__name__}: {value!r:.200}"
    # "?" kinds may be null or absent: the page reads them with optional chaining.
    problems = [f"{name}={value.get(name, '<missing>')!r} (wanted {kind})" for name, kind in fields.items()
                if (name not in value and not kind.endswith("?")) or (name in value and not _kind_ok(value[name], kind))]
    assert not problems, f"{where}: " + "; ".join(problems)
    return value


def array_of(value: Any, fields: dict[str, str], where: str, *, nonempty: bool = True) -> list[dict[str, Any]]:
    """Assert `value` is a bare JSON array of objects of `fields`."""
    assert isinstance(value, list), f"{where}: wanted a bare array, got {type(value).__name__}: {value!r:.200}"
    assert value or not nonempty, f"{where}: wanted at least one element"
    for index, item in enumerate(value):
        shape(item, fields, f"{where}[{index}]")
    return value


USER = {"id": "int", "email": "str", "full_name": "str?", "is_active": "bool", "system_role": "str",
        "badge_color": "str?", "company": "str?"}
TOKENS = {"access_token": "str", "refresh_token": "str", "token_type": "str"}
PROJECT = {"id": "int", "name": "str", "description": "str?", "task_type": "str?", "created_at": "time",
           "updated_at": "time", "user_id": "int?"}
PROJECT_LISTED = {"id": "int", "name": "str", "user_role": "str?", "experiment_count": "int", "updated_at": "time"}
EXPERIMENT = {"id": "int", "experiment_name": "str?", "model_name": "str", "task_type": "str", "framework": "str",
              "status": "str", "tags": "list?", "notes": "str?", "epochs": "int", "batch_size": "int",
              "learning_rate": "num?", "final_accuracy": "num?", "primary_metric": "str?", "created_at": "time",
              "completed_at": "time?"}
MEMBER = {"user_id": "int", "email": "str", "full_name": "str?", "role": "str", "is_owner": "bool",
          "badge_color": "str?"}
# DatasetPanel's search lower-cases name, description, id, format and source unguarded; the table
# upper-cases format (DatasetPanel.tsx:118-123, TrainingConfigPanel.tsx:724).
DATASET = {"id": "str", "name": "str", "description": "str", "format": "str", "labeled": "bool", "num_items": "int",
           "size_mb": "num", "source": "str", "visibility": "str"}
TRAINING_JOB = {"id": "int", "project_name": "str?", "framework": "str", "model_name": "str", "task_type": "str",
                "num_classes": "int?", "dataset_format": "str?", "epochs": "int", "batch_size": "int",
                "learning_rate": "num?", "advanced_config": "dict?", "status": "str", "final_accuracy": "num?",
                "primary_metric": "str?"}
METRIC = {"id": "int", "epoch": "int", "loss": "num?", "accuracy": "num?", "learning_rate": "num?",
          "checkpoint_path": "str?", "extra_metrics": "dict", "created_at": "time"}
LOG = {"id": "int", "log_type": "str", "content": "str", "created_at": "time"}
EXPORT = {"id": "int", "export_format": "str", "status": "str", "version": "int", "is_default": "bool",
          "file_size_mb": "num?", "validation_passed": "bool?", "error_message": "str?", "created_at": "time",
          "completed_at": "time?"}
JOB_STATUSES = {"pending", "queued", "running", "completed", "failed", "cancelled", "cancelling", "retrying",
                "resuming"}


# -- the served app, as `visionyard up` serves it ---------------------------------------------------


@pytest.fixture
def ui_settings(tmp_path: Path) -> ApiSettings:
    """Embedded mode's defaults (calls without a token act as the admin), with a known admin login."""
    return ApiSettings(data_dir=tmp_path / "data", outbox_poll_seconds=0.1, request_timeout=0.3,
                       admin_email=ADMIN_EMAIL, admin_password=ADMIN_PASSWORD)


@pytest.fixture
async def ui(bus: Bus, ui_settings: ApiSettings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """The served app, the admin logged in through the login form, and a project with a finished training job."""
    cheap_password_hashing(monkeypatch)
    async with world_of(ui_settings, bus, populated=False) as world:
        await install_export_predict_manifest(bus)
        world.users[UI] = {"email": ADMIN_EMAIL, **await login(world.http, ADMIN_EMAIL, ADMIN_PASSWORD)}
        created = await world.call(UI, "POST", f"{API}/projects",
                                   json={"name": "Digits", "description": None, "task_type": None})
        assert created.status_code in (200, 201), created.text
        project = created.json()["id"]
        world.ids["project"] = project
        world.ids["dataset"] = await ready_dataset(world, UI, name="digits", project_id=project)
        world.ids["job"] = await completed_job(world, NOAUTH, dataset_id=world.ids["dataset"], project_id=project,
                                               name="digits-run")
        yield world


# -- login and account (contexts/AuthContext.tsx) ---------------------------------------------------


async def test_login_me_register_refresh_and_profile(ui: World) -> None:
    form = {"username": (None, ADMIN_EMAIL), "password": (None, ADMIN_PASSWORD)}
    tokens = shape((await ui.http.post(f"{API}/auth/login", files=form)).json(), TOKENS, "POST /auth/login")
    wrong = await ui.http.post(f"{API}/auth/login", files={**form, "password": (None, "not-the-password")})
    assert wrong.status_code == 401 and isinstance(wrong.json()["detail"], str)

    me = await ui.http.get(f"{API}/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert me.status_code == 200
    shape(me.json(), USER, "GET /auth/me")
    assert me.json()["email"] == ADMIN_EMAIL and me.json()["is_active"] is True

    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    registered = await ui.http.post(f"{API}/auth/register", json={
        "email": email, "password": PASSWORD, "full_name": "New Person", "company": "ACME",
        "division": "Vision", "department": "R&D", "phone_number": "010"})
    assert registered.is_success, registered.text
    again = await ui.http.post(f"{API}/auth/register", json={"email": email, "password": PASSWORD})
    assert not again.is_success and isinstance(again.json()["detail"], str)
    newcomer = await login(ui.http, email, PASSWORD)  # the page logs in right after registering

    renewed = await ui.http.post(f"{API}/auth/refresh", json={"refresh_token": newcomer["refresh_token"]})
    assert renewed.status_code == 200
    shape(renewed.json(), TOKENS, "POST /auth/refresh")

    changed = await ui.http.put(f"{API}/auth/me", headers={"Authorization": f"Bearer {renewed.json()['access_token']}"},
                                json={"full_name": "Renamed Person", "company": "ACME", "bio": "hi"})
    assert changed.status_code == 200
    assert shape(changed.json(), USER, "PUT /auth/me")["full_name"] == "Renamed Person"


# -- projects (Sidebar.tsx, CreateProjectForm.tsx, ProjectDetail.tsx) --------------------------------


async def test_project_list_create_detail_experiments_and_members(ui: World) -> None:
    project = ui.ids["project"]
    listed = array_of((await ui.call(UI, "GET", f"{API}/projects")).json(), PROJECT_LISTED, "GET /projects")
    mine = next(item for item in listed if item["id"] == project)
    assert mine["name"] == "Digits" and mine["user_role"] == "owner" and mine["experiment_count"] == 1

    created = await ui.call(UI, "POST", f"{API}/projects", json={"name": "Pets", "description": None, "task_type": None})
    assert created.is_success and isinstance(created.json()["id"], int)
    duplicate = await ui.call(UI, "POST", f"{API}/projects", json={"name": "Pets", "description": None,
                                                                   "task_type": None})
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["detail"]

    detail = await ui.call(UI, "GET", f"{API}/projects/{project}")
    assert detail.status_code == 200
    shape(detail.json(), PROJECT, f"GET /projects/{project}")
    assert (await ui.call(UI, "GET", f"{API}/projects/987654")).status_code != 200  # the "not found" page

    experiments = array_of((await ui.call(UI, "GET", f"{API}/projects/{project}/experiments")).json(), EXPERIMENT,
                           "GET /projects/{id}/experiments")
    assert [job["id"] for job in experiments] == [ui.ids["job"]]

    members = array_of((await ui.call(UI, "GET", f"{API}/projects/{project}/members")).json(), MEMBER,
                       "GET /projects/{id}/members")
    assert [(m["email"], m["role"], m["is_owner"]) for m in members] == [(ADMIN_EMAIL, "owner", True)]

    edited = await ui.call(UI, "PUT", f"{API}/projects/{project}",
                           json={"name": "Digits v2", "description": "handwritten", "task_type": None})
    assert edited.status_code == 200 and shape(edited.json(), PROJECT, "PUT /projects/{id}")["name"] == "Digits v2"
    clash = await ui.call(UI, "PUT", f"{API}/projects/{project}", json={"name": "Pets", "description": None,
                                                                        "task_type": None})
    assert clash.status_code == 400 and "already exists" in clash.json()["detail"]

    colleague = f"colleague-{uuid.uuid4().hex[:6]}@example.com"
    assert (await ui.http.post(f"{API}/auth/register", json={"email": colleague, "password": PASSWORD})).is_success
    invited = await ui.call(UI, "POST", f"{API}/projects/{project}/members", json={"email": colleague, "role": "member"})
    assert invited.is_success, invited.text
    members = array_of((await ui.call(UI, "GET", f"{API}/projects/{project}/members")).json(), MEMBER, "members")
    added = next(m for m in members if m["email"] == colleague)
    assert added["role"] == "member" and added["is_owner"] is False
    removed = await ui.call(UI, "DELETE", f"{API}/projects/{project}/members/{added['user_id']}")
    assert removed.is_success
    unknown = await ui.call(UI, "POST", f"{API}/projects/{project}/members",
                            json={"email": "nobody@example.com", "role": "member"})
    assert not unknown.is_success and isinstance(unknown.json()["detail"], str)  # alert(error.detail)


# -- datasets (DatasetPanel.tsx, components/datasets/*) ----------------------------------------------


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cats/1.png", PNG)
    return buffer.getvalue()


async def test_datasets_list_create_upload_images_and_delete(ui: World) -> None:
    available = array_of((await ui.call(UI, "GET", f"{API}/datasets/available")).json(), DATASET,
                         "GET /datasets/available")
    assert [d["id"] for d in available] == [ui.ids["dataset"]]
    assert available[0]["format"].upper() == "IMAGEFOLDER"
    labeled = await ui.call(UI, "GET", f"{API}/datasets/available", params={"labeled": "true"})
    array_of(labeled.json(), DATASET, "GET /datasets/available?labeled=true", nonempty=False)

    created = await ui.call(UI, "POST", f"{API}/datasets", json={"name": "pets", "description": "cats",
                                                                 "visibility": "private"})
    assert created.is_success, created.text
    body = shape(created.json(), {"status": "str", "dataset_id": "str", "message": "str"}, "POST /datasets")
    assert body["status"] == "success"
    dataset_id = body["dataset_id"]
    # Listed at once, before any upload: the table upper-cases `format` (a null one crashed the page).
    fresh = array_of((await ui.call(UI, "GET", f"{API}/datasets/available")).json(), DATASET, "after create")
    assert any(d["id"] == dataset_id for d in fresh)
    created_no_description = await ui.call(UI, "POST", f"{API}/datasets", json={"name": "plain", "visibility": "public"})
    assert created_no_description.json()["status"] == "success"
    array_of((await ui.call(UI, "GET", f"{API}/datasets/available")).json(), DATASET, "without a description")

    folder = [("files", ("pets/cats/1.png", PNG, "image/png")), ("files", ("pets/dogs/2.png", PNG, "image/png"))]
    uploaded = await ui.call(UI, "POST", f"{API}/datasets/{dataset_id}/upload-images", files=folder)
    assert uploaded.is_success and uploaded.json()["status"] == "success", uploaded.text
    refused = await ui.call(UI, "POST", f"{API}/datasets/{dataset_id}/upload-images",
                            files=[("files", ("../escape.png", PNG, "image/png"))])
    assert not refused.is_success and isinstance(refused.json().get("detail") or refused.json().get("message"), str)

    zipped = await ui.call(UI, "POST", f"{API}/datasets/upload", files={"file": ("pets.zip", _zip(), "application/zip")})
    assert zipped.is_success, zipped.text
    assert zipped.json()["status"] == "success" and isinstance(zipped.json()["dataset_id"], str)

    images = await ui.call(UI, "GET", f"{API}/datasets/{ui.ids['dataset']}/images")
    # Storage is not running here: the gallery gets an answer it shows as an error, not a hang.
    assert images.status_code == 503 and isinstance(images.json()["detail"], str)
    annotations = await ui.call(UI, "GET", f"{API}/datasets/{ui.ids['dataset']}/file/annotations.json")
    assert annotations.status_code == 404  # an image-folder dataset has none; the gallery treats it as optional

    deleted = await ui.call(UI, "DELETE", f"{API}/datasets/{dataset_id}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "success"


async def test_the_gallery_reads_image_urls(ui: World, fake_services: FakeServices) -> None:
    async def storage_lists(request: ListImagesRequest) -> ListImagesReply:
        """The local backend's answer: no presigned URL, so the API serves the bytes itself."""
        return ListImagesReply(ok=True, total_images=1, images=[ImageEntry(filename="0/a.png", size=40)])

    await fake_services.answer("storage", {subjects.STORAGE_LIST_IMAGES: storage_lists})
    listed = await ui.call(UI, "GET", f"{API}/datasets/{ui.ids['dataset']}/images")
    assert listed.status_code == 200, listed.text
    images = listed.json()["images"]
    array_of(images, {"filename": "str", "presigned_url": "str"}, "GET /datasets/{id}/images images")
    assert images[0]["presigned_url"].startswith("http")


# -- the training wizard (TrainingConfigPanel.tsx, ModelSelector.tsx, DynamicConfigPanel.tsx) -----


async def test_model_catalogue_is_a_bare_array_the_cards_read(ui: World) -> None:
    answer = await ui.call(NOAUTH, "GET", f"{API}/models/list", params={"supported_only": "false"})
    assert answer.status_code == 200
    models = array_of(answer.json(), {"display_name": "str", "description": "str", "framework": "str",
                                      "model_name": "str", "task_types": "list", "parameters": "dict?",
                                      "tags": "list?", "benchmark": "dict?"}, "GET /models/list")
    for model in models:
        assert model["task_types"] and all(isinstance(task, str) for task in model["task_types"])
        minimum = (model.get("parameters") or {}).get("min")
        assert minimum is None or _kind_ok(minimum, "num")  # ModelCard calls parameters.min.toFixed(1)
    assert {m["model_name"] for m in models} == {"simple_cnn", "tiny_resnet"}


async def test_config_schema_has_fields_and_presets(ui: World) -> None:
    for params in ({"framework": "pytorch"}, {"framework": "pytorch", "task_type": "image_classification"}):
        answer = await ui.call(NOAUTH, "GET", f"{API}/training/config-schema", params=params)
        assert answer.status_code == 200, answer.text
        schema = answer.json()
        array_of(schema["fields"], {"name": "str"}, "config-schema fields", nonempty=False)
        assert isinstance(schema.get("presets", {}), dict)


async def test_advanced_config_validation(ui: World) -> None:
    answer = await ui.call(NOAUTH, "POST", f"{API}/training/config/validate",
                           json={"framework": "pytorch", "task_type": "image_classification", "config": {}})
    assert answer.status_code == 200


async def test_model_display_name_and_guide(ui: World) -> None:
    one = await ui.call(NOAUTH, "GET", f"{API}/models/get", params={"framework": "pytorch", "model_name": "simple_cnn"})
    assert one.status_code == 200 and one.json()["display_name"] == "Simple CNN"
    guide = await ui.call(NOAUTH, "GET", f"{API}/models/pytorch/simple_cnn/guide")
    assert guide.status_code == 200 and isinstance(guide.json(), dict)


async def test_the_wizard_creates_a_job_with_the_body_it_sends(ui: World) -> None:
    body = {"project_id": ui.ids["project"], "config": {
        "framework": "pytorch", "model_name": "simple_cnn", "task_type": "image_classification",
        "dataset_id": ui.ids["dataset"], "dataset_format": "imagefolder", "epochs": 3, "batch_size": 16,
        "primary_metric": "accuracy", "primary_metric_mode": "max", "advanced_config": {"epochs": 3}}}
    created = await ui.call(NOAUTH, "POST", f"{API}/training/jobs", json=body)
    assert created.status_code in (200, 201), created.text
    job = shape(created.json(), TRAINING_JOB, "POST /training/jobs")
    assert job["status"] == "pending" and job["project_name"] == "Digits"
    # Without a project (the wizard opened outside one) and without a primary metric.
    loose = {"config": {**body["config"], "primary_metric": None}}
    assert (await ui.call(NOAUTH, "POST", f"{API}/training/jobs", json=loose)).is_success
    bad = await ui.call(NOAUTH, "POST", f"{API}/training/jobs",
                        json={"config": {**body["config"], "epochs": 0}})
    assert bad.status_code == 422
    detail = bad.json()["detail"]  # a string, or an array of {msg}: both are shown
    assert isinstance(detail, str) or all(isinstance(item.get("msg"), str) for item in detail)


# -- the training job page (TrainingPanel.tsx: every call without a token) --------------------------


async def test_job_page_reads_job_metrics_schema_charts_and_logs(ui: World) -> None:
    job_id = ui.ids["job"]
    base = f"{API}/training/jobs/{job_id}"
    job = shape((await ui.call(NOAUTH, "GET", base)).json(), TRAINING_JOB, "GET /training/jobs/{id}")
    assert job["id"] == job_id and job["status"] == "completed" and job["status"] in JOB_STATUSES

    metrics = array_of((await ui.call(NOAUTH, "GET", f"{base}/metrics")).json(), METRIC, "GET …/metrics")
    assert [row["epoch"] for row in metrics][-1] == job["epochs"] == 2  # the last row is the progress bar

    schema = shape((await ui.call(NOAUTH, "GET", f"{base}/metric-schema")).json(),
                   {"primary_metric": "str", "primary_metric_mode": "str", "available_metrics": "list"},
                   "GET …/metric-schema")
    assert "accuracy" in schema["available_metrics"]

    charts = await ui.call(NOAUTH, "GET", f"{base}/mlflow/metrics")
    # The tracker is not running here: 503 with a detail; the charts show "no data" on a non-200.
    assert charts.status_code == 503 and isinstance(charts.json()["detail"], str)

    logs = array_of((await ui.call(NOAUTH, "GET", f"{base}/logs", params={"limit": 1000})).json(), LOG,
                    "GET …/logs?limit=1000")
    assert "epoch 1 done" in [line["content"] for line in logs]
    assert {line["log_type"] for line in logs} >= {"stdout"}


async def test_the_charts_read_the_trackers_histories(ui: World, fake_services: FakeServices) -> None:
    async def tracker(query: TrackerQuery) -> dict[str, Any]:
        return {"found": True, "metrics": {"accuracy": [{"step": 1, "value": 0.5, "timestamp": 1}]}}

    await fake_services.answer("tracker", {subjects.TRACKER_METRICS: tracker})
    charts = await ui.call(NOAUTH, "GET", f"{API}/training/jobs/{ui.ids['job']}/mlflow/metrics")
    assert charts.status_code == 200, charts.text
    body = shape(charts.json(), {"found": "bool", "metrics": "dict", "primary_metric": "str",
                                 "primary_metric_mode": "str"}, "GET …/mlflow/metrics")
    array_of(body["metrics"]["accuracy"], {"step": "int", "value": "num", "timestamp": "any"}, "metrics.accuracy")


async def test_restart_then_start_resume_from_a_checkpoint_and_cancel(ui: World) -> None:
    base = f"{API}/training/jobs/{ui.ids['job']}"
    checkpoint = next(row["checkpoint_path"] for row in (await ui.call(NOAUTH, "GET", f"{base}/metrics")).json()
                      if row["checkpoint_path"])
    restarted = await ui.call(NOAUTH, "POST", f"{base}/restart")
    assert restarted.status_code == 200 and shape(restarted.json(), TRAINING_JOB, "restart")["status"] == "queued"
    started = await ui.call(NOAUTH, "POST", f"{base}/start")  # the page's second call after restart
    assert started.status_code == 200 and started.json()["status"] == "queued", started.text
    cancelled = await ui.call(NOAUTH, "POST", f"{base}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelled", "cancelling")
    resumed = await ui.call(NOAUTH, "POST", f"{base}/start", params={"checkpoint_path": checkpoint, "resume": "true"})
    assert resumed.status_code == 200, resumed.text
    assert shape(resumed.json(), TRAINING_JOB, "start?resume=true")["status"] in ("queued", "resuming")


DEPLOYMENT = {"id": "int", "export_job_id": "int", "deployment_type": "str", "status": "str",
              "deployment_config": "dict", "created_at": "time", "activated_at": "time?", "deactivated_at": "time?",
              "usage_stats": "dict?", "error_message": "str?"}
# DeploymentCard formats these unguarded once `usage_stats` is there: request_count, avg_latency_ms.toFixed,
# total_inference_time_ms / 1000 .toFixed.
USAGE = {"request_count": "int", "total_inference_time_ms": "num", "avg_latency_ms": "num", "last_request_at": "time?"}


def _card(deployment: Any, where: str) -> dict[str, Any]:
    shape(deployment, DEPLOYMENT, where)
    if deployment.get("usage_stats") is not None:
        shape(deployment["usage_stats"], USAGE, f"{where} usage_stats")
    return deployment


async def test_deployments_list_create_test_switch_and_delete(ui: World, fake_services: FakeServices, tmp_path: Path) -> None:
    """The export tab's deployments (DeploymentList, CreateDeploymentModal, DeploymentCard), the Test button
    (TrainingPanel.tsx:1180 reads `deployment_config.api_key/endpoint_url`) and InferenceTestPanel's call."""
    job_id = ui.ids["job"]
    await serve_keep_upload(fake_services, [])
    export_id = await export_job(ui, UI, job_id)
    await asyncio.to_thread(mark_export_completed, ui, export_id)
    listed = await ui.call(UI, "GET", f"{API}/export/deployments", params={"training_job_id": job_id})
    assert listed.status_code == 200 and listed.json()["deployments"] == []  # "No deployments yet"

    created = await ui.call(UI, "POST", f"{API}/export/deployments", json={
        "export_job_id": export_id, "deployment_type": "platform_endpoint", "deployment_config": {"auto_activate": True}})
    assert created.status_code in (200, 201), created.text
    deployment = _card(created.json(), "POST /export/deployments")
    assert deployment["status"] == "active"
    listed = (await ui.call(UI, "GET", f"{API}/export/deployments", params={"training_job_id": job_id})).json()
    cards = [_card(item, "GET /export/deployments deployments[]") for item in listed["deployments"]]
    assert [card["id"] for card in cards] == [deployment["id"]]

    detail = await ui.call(UI, "GET", f"{API}/deployments/{deployment['id']}")  # what the Test button reads
    assert detail.status_code == 200, detail.text
    config = shape(_card(detail.json(), "GET /deployments/{id}")["deployment_config"],
                   {"endpoint_url": "str", "api_key": "str"}, "deployment_config")
    assert config["endpoint_url"].startswith("http")  # fetched from the page's own origin: must be absolute

    # InferenceTestPanel: POST endpoint_url, `Authorization: Bearer <api_key>`, JSON with a base64 image.
    body = {"image": base64.b64encode(PNG).decode(), "confidence_threshold": 0.25, "iou_threshold": 0.45,
            "max_detections": 100}
    async with runner_answering(ui.bus, tmp_path, classify_as("2", 2, 0.93)):
        answer = await ui.http.post(config["endpoint_url"], json=body,
                                    headers={"Authorization": f"Bearer {config['api_key']}"})
    assert answer.status_code == 200, answer.text
    result = shape(answer.json(), {"deployment_id": "int", "task_type": "str", "inference_time_ms": "num",
                                   "detections": "list?", "classification_result": "dict?"}, "POST endpoint_url")
    top = shape(result["classification_result"], {"class_id": "int", "class_name": "str", "confidence": "num"},
                "classification_result")
    assert (top["class_name"], top["confidence"]) == ("2", 0.93)
    refused = await ui.http.post(config["endpoint_url"], json=body, headers={"Authorization": "Bearer vyd_1_nope"})
    assert refused.status_code == 401 and isinstance(refused.json()["detail"], str)
    used = (await ui.call(UI, "GET", f"{API}/deployments/{deployment['id']}")).json()["usage_stats"]
    assert used["request_count"] == 1 and used["avg_latency_ms"] > 0

    off = await ui.call(UI, "PATCH", f"{API}/export/deployments/{deployment['id']}/deactivate")
    assert off.status_code == 200 and _card(off.json(), "deactivate")["status"] == "inactive"
    closed = await ui.http.post(config["endpoint_url"], json=body, headers={"Authorization": f"Bearer {config['api_key']}"})
    assert closed.status_code == 409 and "inactive" in closed.json()["detail"]  # the panel shows `detail`
    on = await ui.call(UI, "PATCH", f"{API}/export/deployments/{deployment['id']}/activate")
    assert on.status_code == 200 and on.json()["status"] == "active"

    download = await ui.call(UI, "POST", f"{API}/export/deployments", json={
        "export_job_id": export_id, "deployment_type": "download", "deployment_config": {}})
    assert download.status_code in (200, 201), download.text
    assert _card(download.json(), "download")["deployment_config"]["download_url"].startswith("http")
    container = await ui.call(UI, "POST", f"{API}/export/deployments", json={
        "export_job_id": export_id, "deployment_type": "container",
        "deployment_config": {"registry": "docker.io", "image_name": "x", "include_runtime": True}})
    assert container.status_code == 422 and "deployment_type" in container.json()["detail"]  # shown as the error

    for made in (deployment["id"], download.json()["id"]):
        assert (await ui.call(UI, "DELETE", f"{API}/export/deployments/{made}")).status_code == 200
    assert (await ui.call(UI, "GET", f"{API}/export/deployments", params={"training_job_id": job_id})).json()[
        "deployments"] == []


# -- the WebSocket (hooks/useTrainingMonitor.ts) ----------------------------------------------------


async def _next(socket: ClientConnection) -> dict[str, Any]:
    message = json.loads(await asyncio.wait_for(socket.recv(), timeout=30))
    assert isinstance(message, dict), message
    return message


async def _first(socket: ClientConnection, kind: str, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The next message of type `kind` (other live messages of the job may come before it; kept in `seen`)."""
    while True:
        message = await _next(socket)
        if seen is not None:
            seen.append(message)
        if message["type"] == kind:
            return message


async def test_websocket_without_last_seq_is_live_only_and_speaks_the_pages_messages(ui: World) -> None:
    job_id = ui.ids["job"]
    url = ui.base_url.replace("http://", "ws://") + f"{API}/ws/training?job_id={job_id}&session_id=page-1"
    async with connect(url) as socket:  # no token, no last_seq: exactly what the page opens
        assert (await _next(socket))["type"] == "connected"
        assert (await _next(socket))["type"] == "subscribed"
        # No replay: the next message is the answer to this ping, not the job's finished history.
        await socket.send(json.dumps({"type": "ping"}))
        assert (await _next(socket))["type"] == "pong"
        key = str(job_id)
        await ui.bus.publish(LogEmitted(job_id=key, attempt=1, seq=20, message="late line", level="WARNING",
                                        event_type="stdout"))
        seen: list[dict[str, Any]] = []
        log = await _first(socket, "training_log", seen)
        shape(log, {"type": "str", "job_id": "int", "level": "str", "message": "str", "timestamp": "str"}, "training_log")
        assert (log["type"], log["job_id"], log["message"]) == ("training_log", job_id, "late line")
        await ui.bus.publish(ProgressReported(job_id=key, attempt=1, seq=21, epoch=2, total_epochs=2,
                                              metrics={"accuracy": 0.95}))
        message = await _first(socket, "training_metrics", seen)
        shape(message, {"job_id": "int", "metrics": "dict"}, "training_metrics")
        # The export list refreshes on export_status_change (cancelling a pending export announces one).
        export_id = await export_job(ui, UI, job_id)
        assert (await ui.call(UI, "POST", f"{API}/export/jobs/{export_id}/cancel")).status_code == 200
        change = await _first(socket, "export_status_change", seen)
        shape(change, {"job_id": "int", "export_job_id": "int", "new_status": "str"}, "export_status_change")
        assert (change["job_id"], change["export_job_id"], change["new_status"]) == (job_id, export_id, "cancelled")
    # The page reopens its socket on every render, with the same session: what happened in between
    # arrives once, and nothing the closed socket already delivered comes again.
    await ui.bus.publish(LogEmitted(job_id=key, attempt=1, seq=22, message="between sockets", event_type="stdout"))
    async with connect(url) as socket:
        assert (await _next(socket))["type"] == "connected"
        assert (await _next(socket))["type"] == "subscribed"
        delivered = max(message["seq"] for message in seen if "seq" in message)
        caught_up = [await _next(socket)]
        while caught_up[-1]["type"] != "training_log":
            caught_up.append(await _next(socket))
        assert caught_up[-1]["message"] == "between sockets"
        # Nothing the first socket had. Where a waiting job stands (`queue_position`) is no event: it has no seq
        # and comes whenever the queue moves.
        events = [message for message in caught_up if message["type"] != "queue_position"]
        assert all(message["seq"] > delivered for message in events), caught_up
        await socket.send(json.dumps({"type": "ping"}))
        assert (await _next(socket))["type"] == "pong"


class _PageSocket:
    """A browser page's socket whose every message is kept, to say at the end what it got and what it never did."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.got: list[dict[str, Any]] = []
        self._fresh: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if message["type"] == "queue_position":
                continue  # where a waiting job stands: not what these tests follow
            self.got.append(message)
            self._fresh.put_nowait(message)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self._fresh.get(), timeout=30)

    def lines(self) -> list[str]:
        return [message.get("message") or message["type"] for message in self.got]


async def _page_counts(ui: World, joins: int, elected: int) -> None:
    """Wait until the API has placed the page's sockets (joined, and given the job to a socket, that many times)."""
    async def placed() -> bool:
        pages = getattr(ui.app.state, "live_pages", None)
        return pages is not None and pages.joins >= joins and pages.elected >= elected

    await until(placed)


async def test_a_socket_the_page_keeps_open_carries_the_job_and_its_other_sockets_stay_silent(
    ui: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page opens a socket per render and closes it at the next (useTrainingMonitor.ts), and never closes the
    ones its reconnect timer opens: the oldest socket that stays open carries the job's messages, the others say
    nothing at all (not even to a ping: the page would re-render on it), and when the carrier closes the page's
    next one goes on from what it wrote; each message reaches the page once."""
    from visionyard.api.live import page as livepage

    monkeypatch.setattr(livepage, "STABLE_SECONDS", 0.2)
    job_id = ui.ids["job"]
    key = str(job_id)
    url = ui.base_url.replace("http://", "ws://") + f"{API}/ws/training?job_id={job_id}"
    browser = {"Origin": "http://localhost:3300", "User-Agent": "HeadlessChrome/156"}

    async def log_line(seq: int, text: str) -> None:
        await ui.bus.publish(LogEmitted(job_id=key, attempt=1, seq=seq, message=text, event_type="stdout"))

    async with connect(url, additional_headers=browser) as socket_1:
        kept = _PageSocket(socket_1)
        await _page_counts(ui, joins=1, elected=0)
        await log_line(30, "one")  # before any socket of the page stayed open: it waits, it is not lost
        # Once the socket has stayed open it carries, from the page's first moment.
        assert [(await kept.next())["type"] for _ in range(3)] == ["connected", "subscribed", "training_log"]
        async with connect(url, additional_headers=browser) as socket_2:  # a render's socket
            render = _PageSocket(socket_2)
            await _page_counts(ui, joins=2, elected=1)
            await log_line(31, "two")
            assert (await kept.next())["message"] == "two"
            async with connect(url) as script:  # no Origin: not a browser page, never muted, live only
                assert [(await _next(script))["type"] for _ in range(2)] == ["connected", "subscribed"]
                await log_line(32, "three")
                assert (await _first(script, "training_log"))["message"] == "three"
                assert (await kept.next())["message"] == "three"
            await socket_2.send(json.dumps({"type": "ping"}))
            await socket_1.close()  # the carrier goes: the page's other socket, still open, goes on from it
            await _page_counts(ui, joins=2, elected=2)
            await log_line(33, "four")
            assert [(await render.next())["type"] for _ in range(3)] == ["connected", "subscribed", "training_log"]
    # Closed between renders: the page's next socket starts where the last one stopped.
    await log_line(34, "five")
    async with connect(url, additional_headers=browser) as socket_3:
        third = _PageSocket(socket_3)
        assert [(await third.next())["type"] for _ in range(3)] == ["connected", "subscribed", "training_log"]
        await socket_3.send(json.dumps({"type": "ping"}))
        assert (await third.next())["type"] == "pong"  # the carrier answers
    assert kept.lines() == ["connected", "subscribed", "one", "two", "three"]
    assert render.lines() == ["connected", "subscribed", "four"]
    assert third.lines() == ["connected", "subscribed", "five", "pong"]


async def test_websocket_status_change_shape(ui: World) -> None:
    job_id = ui.ids["job"]
    url = ui.base_url.replace("http://", "ws://") + f"{API}/ws/training?job_id={job_id}"
    async with connect(url) as socket:
        assert [(await _next(socket))["type"] for _ in range(2)] == ["connected", "subscribed"]
        restarted = await ui.call(NOAUTH, "POST", f"{API}/training/jobs/{job_id}/restart")
        assert restarted.status_code == 200
        change = await _first(socket, "training_status_change")
        shape(change, {"job_id": "int", "old_status": "str", "new_status": "str"}, "training_status_change")
        assert (change["job_id"], change["new_status"]) == (job_id, "queued")


async def test_a_restarted_jobs_socket_is_not_held_by_the_previous_attempts_end(
    ui: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page restarts a finished job and reopens its socket: the new feed replays the job's events,
    among them the previous attempt's `training_complete`, which must not wait for the row to show a
    terminal status again (it shows the new attempt, queued)."""
    from visionyard.api.live import endpoints as ws

    # However long the wait for the projection is, the new attempt's messages must not queue behind it.
    monkeypatch.setattr(ws, "PROJECTION_WAIT_SECONDS", 3600.0)
    job_id = ui.ids["job"]
    assert (await ui.call(NOAUTH, "POST", f"{API}/training/jobs/{job_id}/restart")).status_code == 200
    url = ui.base_url.replace("http://", "ws://") + f"{API}/ws/training?job_id={job_id}"
    async with connect(url) as socket:
        assert [(await _next(socket))["type"] for _ in range(2)] == ["connected", "subscribed"]
        await ui.bus.publish(LogEmitted(job_id=str(job_id), attempt=2, seq=1, message="attempt 2 begins",
                                        event_type="stdout"))
        line = await _first(socket, "training_log")  # the restart's status change may come first
        assert line["message"] == "attempt 2 begins"


# -- export (components/export/*) -------------------------------------------------------------------


async def test_export_capabilities_create_list_download_and_delete(ui: World) -> None:
    job_id = ui.ids["job"]
    capabilities = await ui.call(UI, "GET", f"{API}/export/capabilities", params={"training_job_id": job_id})
    formats = array_of(capabilities.json()["supported_formats"],
                       {"format": "str", "supported": "bool", "native_support": "bool"}, "supported_formats")
    assert {f["format"] for f in formats if f["supported"]} == {"onnx", "torchscript"}

    body = {"training_job_id": job_id, "export_format": "onnx",
            "export_config": {"opset_version": 17, "dynamic_axes": {"images": [0]}},
            "validation_config": {"validate_outputs": True, "tolerance": 0.001, "num_samples": 10}}
    created = await ui.call(UI, "POST", f"{API}/export/jobs", json=body)
    assert created.status_code in (200, 201), created.text
    plain = await ui.call(UI, "POST", f"{API}/export/jobs",
                          json={"training_job_id": job_id, "export_format": "onnx", "export_config": {"opset_version": 17}})
    assert plain.is_success, plain.text
    # Options of formats Visionyard does not export to are accepted or refused with a detail, never a crash.
    for options in ({"fp16": True, "int8": False, "max_batch_size": 8}, {"minimum_deployment_target": "iOS15"},
                    {"opset_version": 17, "embed_preprocessing": True}):
        answer = await ui.call(UI, "POST", f"{API}/export/jobs",
                               json={"training_job_id": job_id, "export_format": "onnx", "export_config": options})
        assert answer.is_success or (answer.status_code == 422 and isinstance(answer.json()["detail"], str)), answer.text
    await asyncio.to_thread(mark_export_completed, ui, created.json()["id"])

    listed = await ui.call(UI, "GET", f"{API}/export/training/{job_id}/exports")
    exports = array_of(listed.json()["export_jobs"], EXPORT, "GET /export/training/{job}/exports export_jobs")
    assert created.json()["id"] in [e["id"] for e in exports]

    download = await ui.call(UI, "GET", f"{API}/export/{created.json()['id']}/download")
    assert download.status_code == 200 and isinstance(download.json()["download_url"], str)
    # window.open(download_url): a browser link, which carries no Authorization header.
    assert download.json()["download_url"].startswith("http")

    cancelled = await ui.call(UI, "POST", f"{API}/export/jobs/{plain.json()['id']}/cancel")
    assert cancelled.status_code == 200
    for export_id in (created.json()["id"], plain.json()["id"]):
        assert (await ui.call(UI, "DELETE", f"{API}/export/jobs/{export_id}")).is_success
    remaining = (await ui.call(UI, "GET", f"{API}/export/training/{job_id}/exports")).json()["export_jobs"]
    assert {created.json()["id"], plain.json()["id"]}.isdisjoint(e["id"] for e in remaining)


# -- test inference and validation (TestInferencePanel.tsx, validation tabs: no token) --------------


async def test_validation_summary_and_epoch_results(ui: World) -> None:
    job_id = ui.ids["job"]
    summary = await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/summary")
    assert summary.status_code == 200, summary.text
    body = shape(summary.json(), {"epoch_metrics": "list", "best_epoch": "int?", "best_metric_name": "str?"},
                 "GET /validation/jobs/{id}/summary")
    epochs = array_of(body["epoch_metrics"], {"epoch": "int", "checkpoint_path": "str?"}, "epoch_metrics")
    assert body["best_epoch"] == 2 and any(e["epoch"] == 2 and e["checkpoint_path"] for e in epochs)
    results = await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/results/1")
    assert results.status_code == 200, results.text
    shape(results.json(), {"class_names": "list", "confusion_matrix": "list", "per_class_metrics": "list"},
          "GET /validation/jobs/{id}/results/{epoch}")


async def test_test_inference_upload_create_poll_and_results(ui: World, fake_services: FakeServices, tmp_path: Path) -> None:
    job_id = ui.ids["job"]
    kept: list[Any] = []
    await serve_keep_upload(fake_services, kept)
    uploaded = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/upload-images",
                             params={"training_job_id": job_id},
                             files=[("files", ("cat.png", PNG, "image/png")), ("files", ("dog.png", PNG, "image/png"))])
    assert uploaded.status_code == 200, uploaded.text
    upload = shape(uploaded.json(), {"s3_prefix": "str", "uploaded_files": "list", "total_files": "int"},
                   "POST upload-images")
    array_of(upload["uploaded_files"], {"original_filename": "str", "unique_filename": "str"}, "uploaded_files")
    assert upload["total_files"] == 2

    summary = (await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/summary")).json()
    checkpoint = next(e["checkpoint_path"] for e in summary["epoch_metrics"] if e["epoch"] == summary["best_epoch"])
    created = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/jobs", json={
        "training_job_id": job_id, "checkpoint_path": checkpoint, "inference_type": "batch",
        "input_data": {"image_paths_s3": upload["s3_prefix"], "confidence_threshold": 0.25, "iou_threshold": 0.45,
                       "max_detections": 100, "image_size": 640, "device": "cpu", "save_txt": False,
                       "save_conf": False, "save_crop": False}})
    assert created.status_code in (200, 201), created.text
    inference_id = created.json()["id"]
    assert isinstance(inference_id, int)  # the e2e script parses it with argparse type=int

    detail = await ui.call(NOAUTH, "GET", f"{API}/test_inference/inference/jobs/detail/{inference_id}")
    shape(detail.json(), {"status": "str", "total_images": "int?", "avg_inference_time_ms": "num?"}, "detail")

    # The predictor's part: results staged, then `completed` (applied by the real projector).
    rows = [{"image_name": item["unique_filename"], "predicted_label": "1", "predicted_label_id": 1, "confidence": 0.8,
             "top5_predictions": [{"label": "1", "confidence": 0.8}], "predicted_boxes": None,
             "inference_time_ms": 3.0} for item in upload["uploaded_files"]]
    name, sha256 = await stage_results(ui.bus, tmp_path, rows, name=f"results/{inference_id}/1/results.json")
    stamp = {"job_id": str(inference_id), "attempt": 1, "training_job_id": str(job_id)}
    await ui.bus.publish(InferenceStarted(**stamp, seq=1, runner_id="r1"))
    await ui.bus.publish(InferenceCompleted(**stamp, seq=2, results={"model_name": "simple_cnn"}, results_object=name,
                                            results_sha256=sha256))

    async def completed() -> dict[str, Any] | None:  # the page polls detail every 2 s
        body = (await ui.call(NOAUTH, "GET", f"{API}/test_inference/inference/jobs/detail/{inference_id}")).json()
        return body if body["status"] == "completed" else None

    done = shape(await until(completed), {"total_images": "int", "avg_inference_time_ms": "num"}, "detail, completed")
    assert done["total_images"] == 2
    results = await ui.call(NOAUTH, "GET", f"{API}/test_inference/inference/jobs/{inference_id}/results")
    assert results.status_code == 200
    listed = array_of(results.json()["results"], {"image_name": "str", "inference_time_ms": "num?",
                                                  "predicted_boxes": "list?", "predictions": "list?",
                                                  "top5_predictions": "list?"}, "…/results results")
    # The page maps each result back to its file through the upload's unique_filename.
    assert {r["image_name"] for r in listed} == {item["unique_filename"] for item in upload["uploaded_files"]}


async def test_the_original_e2e_inference_scripts_calls(ui: World, fake_services: FakeServices, tmp_path: Path) -> None:
    """platform/backend/tests/e2e/test_inference_e2e.py of the original platform: the job id is an integer
    (argparse type=int), the checkpoint is the job's `best_checkpoint_path`, the images go as the upload's
    `s3_prefix` string, and it formats the timings with `:.1f` (a null there is a TypeError)."""
    job_id = ui.ids["job"]
    await serve_keep_upload(fake_services, [])
    job = (await ui.call(NOAUTH, "GET", f"{API}/training/jobs/{job_id}")).json()
    checkpoint = shape(job, {"model_name": "str", "best_checkpoint_path": "str"}, "job")["best_checkpoint_path"]
    uploaded = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/upload-images",
                             params={"training_job_id": job_id}, files=[("files", ("a.jpg", PNG, "image/jpeg"))])
    assert uploaded.status_code == 200, uploaded.text
    upload = shape(uploaded.json(), {"inference_session_id": "str", "s3_prefix": "str", "total_files": "int",
                                     "uploaded_files": "list"}, "upload-images")
    created = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/jobs", json={
        "training_job_id": job_id, "checkpoint_path": checkpoint, "inference_type": "batch",
        "input_data": {"image_paths_s3": upload["s3_prefix"], "confidence_threshold": 0.25, "iou_threshold": 0.45}})
    assert created.status_code in (200, 201), created.text
    inference = shape(created.json(), {"id": "int", "status": "str"}, "POST inference/jobs")
    rows = [{"image_name": upload["uploaded_files"][0]["unique_filename"], "predicted_label": "2",
             "predicted_label_id": 2, "confidence": 0.7, "inference_time_ms": 4.0,
             "top5_predictions": [{"label": "2", "label_id": 2, "confidence": 0.7}]}]
    name, sha256 = await stage_results(ui.bus, tmp_path, rows, name=f"results/{inference['id']}/1/results.json")
    stamp = {"job_id": str(inference["id"]), "attempt": 1, "training_job_id": str(job_id)}
    await ui.bus.publish(InferenceStarted(**stamp, seq=1, runner_id="r1"))
    await ui.bus.publish(InferenceCompleted(**stamp, seq=2, results={}, results_object=name, results_sha256=sha256))

    async def completed() -> dict[str, Any] | None:
        body = (await ui.call(NOAUTH, "GET", f"{API}/test_inference/inference/jobs/detail/{inference['id']}")).json()
        return body if body["status"] == "completed" else None

    shape(await until(completed), {"total_images": "int", "total_inference_time_ms": "num",
                                   "avg_inference_time_ms": "num"}, "detail, completed")
    results = (await ui.call(NOAUTH, "GET", f"{API}/test_inference/inference/jobs/{inference['id']}/results")).json()
    assert shape(results, {"total_count": "int", "results": "list"}, "results")["total_count"] == 1
    shape(results["results"][0], {"image_name": "str", "inference_time_ms": "num", "predictions": "list"}, "results[0]")
    # It prints each prediction's `class_name` (a missing one shows as "unknown").
    assert [(p["class_name"], p["confidence"]) for p in results["results"][0]["predictions"]] == [("2", 0.7)]


async def test_single_image_inference_path(ui: World, fake_services: FakeServices, tmp_path: Path) -> None:
    """TestInferencePanel's single-image path: upload-image (multipart `file`, ?session_id=) → `server_path`,
    quick (query parameters) → the result the panel logs, and the session's release when the panel closes."""
    job_id = ui.ids["job"]
    await serve_keep_upload(fake_services, [])
    session = str(uuid.uuid4())  # crypto.randomUUID()
    uploaded = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/upload-image",
                             params={"session_id": session}, files={"file": ("cat.png", PNG, "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    server_path = shape(uploaded.json(), {"server_path": "str"}, "upload-image")["server_path"]
    summary = (await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/summary")).json()
    checkpoint = next(e["checkpoint_path"] for e in summary["epoch_metrics"] if e["epoch"] == summary["best_epoch"])
    params = {"training_job_id": job_id, "image_path": server_path, "confidence_threshold": 0.25,
              "iou_threshold": 0.45, "max_detections": 100, "top_k": 5, "checkpoint_path": checkpoint}
    async with runner_answering(ui.bus, tmp_path, classify_as("1", 1, 0.7)) as ran:
        answer = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/quick", params=params)
    assert answer.status_code == 200, answer.text
    result = shape(answer.json(), {"task_type": "str", "inference_time_ms": "num", "top5_predictions": "list",
                                   "predicted_boxes": "list?", "num_detections": "int?"}, "quick")
    assert result["task_type"] == "image_classification"  # the panel's spelling
    assert result["top5_predictions"][0]["label"] == "1" and result["top5_predictions"][0]["confidence"] == 0.7
    assert ran[0].image_uris == [server_path] and ran[0].checkpoint.uri == checkpoint
    released = await ui.call(NOAUTH, "DELETE", f"{API}/test_inference/inference/session/{session}")
    assert released.status_code == 200 and released.json()["deleted_files"] == 1
    # On every unmount, uploaded or not: an unknown session is released as well (nothing to delete).
    again = await ui.call(NOAUTH, "DELETE", f"{API}/test_inference/inference/session/{session}")
    assert again.status_code == 200 and again.json()["deleted_files"] == 0
    gone = await ui.call(NOAUTH, "POST", f"{API}/test_inference/inference/quick", params=params)
    assert gone.status_code == 422 and "image_path" in gone.json()["detail"]


IMAGE_ROW = {"id": "int", "job_id": "int", "epoch": "int", "image_path": "str", "image_name": "str",
             "image_index": "int", "true_label": "str", "true_label_id": "int", "predicted_label": "str",
             "predicted_label_id": "int", "confidence": "num", "is_correct": "bool"}


async def test_validation_images(ui: World, fake_services: FakeServices) -> None:
    """The validation tab's ImageViewer: one confusion-matrix cell's images, then each image by id."""
    job_id = ui.ids["job"]
    cell = await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/results/1/images",
                         params={"true_label_id": 1, "predicted_label_id": 0, "skip": 0, "limit": 20})
    assert cell.status_code == 200, cell.text
    body = shape(cell.json(), {"images": "list", "total_count": "int"}, "…/results/{epoch}/images")
    rows = array_of(body["images"], IMAGE_ROW, "images")
    assert body["total_count"] == 1 and rows[0]["image_path"] == "1/img5.png" and rows[0]["is_correct"] is False
    every = (await ui.call(NOAUTH, "GET", f"{API}/validation/jobs/{job_id}/results/1/images",
                           params={"limit": 1000})).json()
    assert every["total_count"] == 15 and sum(not row["is_correct"] for row in every["images"]) == 1

    async def storage_lists(request: ListImagesRequest) -> ListImagesReply:
        return ListImagesReply(ok=True, total_images=1, images=[ImageEntry(filename="1/img5.png", size=len(PNG))])

    async def storage_reads(asked: ReadImageRequest) -> ReadImageReply:
        assert (asked.filename, asked.content_hash) == ("1/img5.png", "hash-1")  # the job's pinned version
        return ReadImageReply(ok=True, content_b64=base64.b64encode(PNG).decode(), content_type="image/png",
                              size=len(PNG))

    await fake_services.answer("storage", {subjects.STORAGE_LIST_IMAGES: storage_lists,
                                           subjects.STORAGE_READ_IMAGE: storage_reads})
    picture = await ui.http.get(f"{API}/validation/images/{rows[0]['id']}")  # an <img src>: no header
    assert picture.status_code == 200 and picture.content == PNG
    assert picture.headers["content-type"] == "image/png"


async def test_dataset_analyze(ui: World) -> None:
    """The wizard's legacy dataset-path field (TrainingConfigPanel.tsx:313, no token): `status`,
    `dataset_info.format`; refusals are shown from `message`."""
    answer = await ui.call(NOAUTH, "POST", f"{API}/datasets/analyze",
                           json={"path": ui.ids["dataset"], "format_hint": None})
    assert answer.status_code == 200, answer.text
    body = shape(answer.json(), {"status": "str", "dataset_info": "dict"}, "POST /datasets/analyze")
    assert body["status"] == "success" and body["dataset_info"]["format"] == "imagefolder"
    by_name = (await ui.call(NOAUTH, "POST", f"{API}/datasets/analyze", json={"path": "digits", "format_hint": None})).json()
    assert by_name["dataset_info"]["dataset_id"] == ui.ids["dataset"]
    host = await ui.call(NOAUTH, "POST", f"{API}/datasets/analyze", json={"path": "/data/digits", "format_hint": None})
    assert host.status_code == 422 and host.json()["status"] != "success"
    assert host.json()["message"].startswith("path:")


# -- CORS (every browser call) ----------------------------------------------------------------------


async def test_cors_preflight_and_answers_from_the_frontends_origin(ui: World) -> None:
    origin = "http://localhost:3000"
    preflight = await ui.http.options(f"{API}/training/jobs", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = await ui.call(NOAUTH, "GET", f"{API}/training/jobs/{ui.ids['job']}", headers={"Origin": origin})
    assert answer.headers["access-control-allow-origin"] == origin
    missing = await ui.call(NOAUTH, "GET", f"{API}/training/jobs/987654", headers={"Origin": origin})
    assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == origin
    elsewhere = await ui.http.options(f"{API}/training/jobs", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    assert elsewhere.headers.get("access-control-allow-origin") != "https://evil.example.com"
