"""Deployments against the served API with authentication on: who may do what, the endpoint's key, what the
endpoint runs (an ordinary inference job answered by a runner), what it leaves behind, and how it fails.

The runner's part is played by `runner_answering` (it pulls the real `cmd.infer` from the runners' consumer
and publishes what a predictor's run publishes); storage's keeping of the image by `serve_keep_upload`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from visionyard.api.config import ApiSettings
from visionyard.api.db.models_exports import InferenceJob, InferenceUpload
from visionyard.shared.bus import Bus
from visionyard.shared.events import ArtifactStored, CheckpointStaged, JobCompleted, JobStarted
from visionyard.shared.requests import KeepUploadRequest

from ..access_world import (
    API,
    PNG,
    World,
    authenticated_settings,
    cheap_password_hashing,
    export_job,
    mark_export_completed,
    world_of,
)
from ..conftest import FakeServices, until
from ..export_inference_world import classify_as, released_uploads, runner_answering, serve_keep_upload

pytestmark = pytest.mark.integration

BODY = {"image": base64.b64encode(PNG).decode(), "confidence_threshold": 0.25, "iou_threshold": 0.45,
        "max_detections": 100}


@pytest.fixture
async def world(bus: Bus, fake_services: FakeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> AsyncIterator[World]:
    """The served app (authentication on) with owner/member/viewer/stranger, a completed export deployed three
    times (`deployment`, `deployment_member`, `deployment_owner`), and storage keeping uploads (`kept`)."""
    cheap_password_hashing(monkeypatch)
    settings = authenticated_settings(tmp_path)
    async with world_of(settings, bus) as built:
        kept: list[KeepUploadRequest] = []
        await serve_keep_upload(fake_services, kept)
        built.ids["kept"] = kept
        yield built


def _endpoint(world: World, deployment: str) -> str:
    return f"{API}/deployments/{world.ids[deployment]}/predict"


def _key(world: World, deployment: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.ids[deployment + '_key']}"}


def _count(world: World, model: Any) -> int:
    with world.app.state.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


async def test_the_key_opens_its_own_deployment_only_and_members_see_it_again(world: World, tmp_path: Path) -> None:
    async with runner_answering(world.bus, tmp_path, classify_as("1", 1, 0.9)) as ran:
        answered = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
        assert answered.status_code == 200, answered.text
        assert answered.json()["classification_result"] == {"class_id": 1, "class_name": "1", "confidence": 0.9}
        # Another deployment's key, user credentials (the owner's token, an API key), none, a forged one.
        owner_key = (await world.call("owner", "POST", f"{API}/auth/api-keys",
                                      json={"name": "k", "project_ids": [world.ids["project"]]})).json()["key"]
        forged = world.ids["deployment_key"][:-4] + "AAAA"
        for headers in (_key(world, "deployment_owner"), {"Authorization": f"Bearer {world.token('owner')}"},
                        {"Authorization": f"Bearer {owner_key}"}, {"X-API-Key": owner_key}, {},
                        {"Authorization": f"Bearer {forged}"}, {"Authorization": world.ids["deployment_key"]}):
            refused = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert "deployment" in refused.json()["detail"] and refused.headers["www-authenticate"].startswith("Bearer")
        # Nor does a deployment's key open anything else.
        as_user = await world.http.get(f"{API}/deployments/{world.ids['deployment']}", headers=_key(world, "deployment"))
        assert as_user.status_code == 401
    single = [command for command in ran if command.inference_type == "single"]  # not populate's dataset job
    assert len(single) == 1  # the refused calls ran nothing
    assert single[0].training_job_id == str(world.ids["job"]) and single[0].checkpoint.kind == "best"

    # The page reads the key again whenever Test is pressed: the same key, for members and owners only.
    for role in ("owner", "member"):
        shown = (await world.call(role, "GET", f"{API}/deployments/{world.ids['deployment']}")).json()
        assert shown["deployment_config"]["api_key"] == world.ids["deployment_key"]
    viewed = (await world.call("viewer", "GET", f"{API}/deployments/{world.ids['deployment']}")).json()
    assert viewed["deployment_config"]["api_key"] is None and viewed["deployment_config"]["endpoint_url"]
    listed = (await world.call("viewer", "GET", f"{API}/export/deployments",
                               params={"training_job_id": world.ids["job"]})).json()["deployments"]
    assert {item["id"] for item in listed} >= {world.ids["deployment"]}
    assert all(item["deployment_config"].get("api_key") is None for item in listed)
    # Deleted: the key stops working.
    assert (await world.call("member", "DELETE", f"{API}/export/deployments/{world.ids['deployment_member']}")).status_code == 200
    gone = await world.http.post(_endpoint(world, "deployment_member"), json=BODY, headers=_key(world, "deployment_member"))
    assert gone.status_code == 401


async def test_an_answer_counts_in_usage_and_leaves_no_uploaded_image(world: World, tmp_path: Path) -> None:
    multipart = {"file": ("cat.png", PNG, "image/png")}
    async with runner_answering(world.bus, tmp_path, classify_as("0", 0, 0.6)):
        first = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
        second = await world.http.post(_endpoint(world, "deployment"), files=multipart,
                                       data={"confidence_threshold": "0.5"}, headers=_key(world, "deployment"))
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert first.json()["inference_time_ms"] == 3.5 and first.json()["latency_ms"] > 0
    usage = (await world.call("owner", "GET", f"{API}/deployments/{world.ids['deployment']}")).json()["usage_stats"]
    assert usage["request_count"] == 2 and usage["total_inference_time_ms"] == 7.0
    assert usage["avg_latency_ms"] >= usage["avg_inference_time_ms"] > 0 and usage["last_request_at"]

    # Each request's image was kept for the runner, then released: no row left, storage told to delete it.
    kept: list[KeepUploadRequest] = world.ids["kept"]
    assert len(kept) == 2 and _count(world, InferenceUpload) == 0
    released = await released_uploads(world.bus, 2)
    assert sorted(command.session_id for command in released) == sorted(request.session_id for request in kept)
    assert all(len(command.keys) == 1 and command.keys[0].startswith(f"uploads/{command.session_id}/")
               for command in released)


async def test_inactive_or_retrained_deployments_refuse_clearly_and_run_nothing(world: World, tmp_path: Path) -> None:
    deployment = world.ids["deployment"]
    off = await world.call("member", "PATCH", f"{API}/export/deployments/{deployment}/deactivate")
    assert off.status_code == 200 and off.json()["status"] == "inactive" and off.json()["deactivated_at"]
    jobs = _count(world, InferenceJob)
    closed = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
    assert closed.status_code == 409 and f"deployment {deployment} is inactive" in closed.json()["detail"]
    # A wrong key learns nothing about the deployment's state.
    wrong = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment_owner"))
    assert wrong.status_code == 401
    assert (await world.call("member", "PATCH", f"{API}/export/deployments/{deployment}/activate")).json()["status"] == "active"

    await _train_again(world, world.ids["job"])
    stale = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
    assert stale.status_code == 409 and "trained again" in stale.json()["detail"]
    assert _count(world, InferenceJob) == jobs and world.ids["kept"] == []  # nothing was run or kept
    await world.call("owner", "PATCH", f"{API}/export/deployments/{deployment}/deactivate")
    again = await world.call("owner", "PATCH", f"{API}/export/deployments/{deployment}/activate")
    assert again.status_code == 409 and "export and deploy again" in again.json()["detail"]
    redeploy = await world.call("owner", "POST", f"{API}/export/deployments",
                                json={"export_job_id": world.ids["export"], "deployment_type": "platform_endpoint"})
    assert redeploy.status_code == 409 and "export_job_id" in redeploy.json()["detail"]


async def _train_again(world: World, job_id: int) -> None:
    """Restart the job and let a runner's attempt 2 store a different `best` checkpoint."""
    assert (await world.call("owner", "POST", f"{API}/training/jobs/{job_id}/restart")).status_code == 200
    key = str(job_id)
    for event in (
        JobStarted(job_id=key, attempt=2, seq=1, runner_id="r2"),
        CheckpointStaged(job_id=key, attempt=2, seq=2, checkpoint_kind="best", epoch=2, size_bytes=12,
                         object_name=f"ckpt/{key}/2/best.pt", sha256="e" * 64),
        ArtifactStored(job_id=key, attempt=2, seq=2, checkpoint_kind="best", epoch=2, size_bytes=12,
                       uri=f"file:///store/checkpoints/{key}/best.pt", sha256="e" * 64),
        JobCompleted(job_id=key, attempt=2, seq=3, total_epochs_completed=2, final_metrics={"accuracy": 0.95},
                     declared_checkpoints=["best"]),
    ):
        await world.bus.publish(event)

    async def retrained() -> bool:
        job = (await world.call("owner", "GET", f"{API}/training/jobs/{job_id}")).json()
        return bool(job["status"] == "completed" and job["attempt"] == 2)

    await until(retrained)


async def test_a_slow_or_failing_runner_gives_504_or_502_and_the_job_is_not_left_running(
    world: World, tmp_path: Path
) -> None:
    settings: ApiSettings = world.app.state.settings
    settings.inference_wait_seconds = 0.5  # nobody runs the command
    timed_out = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
    assert timed_out.status_code == 504 and "was cancelled" in timed_out.json()["detail"]
    settings.inference_wait_seconds = 120.0
    with world.app.state.session_factory() as session:
        statuses = [row.status for row in session.scalars(select(InferenceJob).where(
            InferenceJob.id != str(world.ids["inference"])))]  # populate's own dataset job aside
    assert statuses == ["cancelled"]

    async with runner_answering(world.bus, tmp_path, None, fail="CUDA out of memory") as ran:
        failed = await world.http.post(_endpoint(world, "deployment"), json=BODY, headers=_key(world, "deployment"))
    assert failed.status_code == 502 and "CUDA out of memory" in failed.json()["detail"]
    assert [command.inference_type for command in ran].count("single") >= 1
    usage = (await world.call("owner", "GET", f"{API}/deployments/{world.ids['deployment']}")).json()["usage_stats"]
    assert usage["request_count"] == 0  # only answered predictions count
    assert _count(world, InferenceUpload) == 0  # released either way


async def test_bad_images_and_bodies_are_refused_naming_the_field_before_anything_runs(world: World) -> None:
    cases = [
        ({"json": {"image": "not base64 !!"}}, 422, "image"),
        ({"json": {"image": base64.b64encode(b"just text, no image").decode()}}, 422, "image"),
        ({"json": {"picture": BODY["image"]}}, 422, "image"),
        ({"json": {**BODY, "confidence_threshold": 3}}, 422, "confidence_threshold"),
        ({"content": b"raw bytes", "headers": {"Content-Type": "image/png"}}, 422, "image"),
        ({"files": {"other": ("a.png", PNG, "image/png")}}, 422, "file"),
    ]
    for kwargs, status, field in cases:
        headers = {**kwargs.pop("headers", {}), **_key(world, "deployment")}
        answer = await world.http.post(_endpoint(world, "deployment"), headers=headers, **kwargs)
        assert answer.status_code == status and field in answer.json()["detail"], (kwargs, answer.text)
    assert _count(world, InferenceJob) == 1 and world.ids["kept"] == []  # only populate's own inference job


async def test_what_cannot_be_deployed_is_refused_and_a_deployed_export_is_kept(world: World) -> None:
    job = world.ids["job"]
    pending_export = await export_job(world, "owner", job)
    unfinished = await world.call("owner", "POST", f"{API}/export/deployments",
                                  json={"export_job_id": pending_export, "deployment_type": "download"})
    assert unfinished.status_code == 409 and "not completed" in unfinished.json()["detail"]
    for body, field in (
        ({"deployment_type": "container", "deployment_config": {"registry": "docker.io"}}, "deployment_type"),
        ({"deployment_type": "edge_package", "deployment_config": {"optimization_level": "fastest"}},
         "deployment_config.optimization_level"),
        ({"deployment_type": "platform_endpoint", "deployment_config": {"replicas": 3}}, "deployment_config.replicas"),
        ({"deployment_type": "serverless"}, "deployment_type"),
    ):
        refused = await world.call("owner", "POST", f"{API}/export/deployments",
                                   json={"export_job_id": world.ids["export"], **body})
        assert refused.status_code == 422 and field in refused.json()["detail"], refused.text
    missing = await world.call("owner", "POST", f"{API}/export/deployments", json={"export_job_id": 987654})
    assert missing.status_code == 404 and "export_job_id" in missing.json()["detail"]

    edge = await world.call("member", "POST", f"{API}/export/deployments", json={
        "export_job_id": world.ids["export"], "deployment_type": "edge_package",
        "deployment_config": {"package_name": "pi", "optimization_level": "balanced"}})
    assert edge.status_code == 201, edge.text
    config = edge.json()["deployment_config"]
    assert config["package_url"] == config["download_url"] and "/package?ticket=" in config["package_url"]
    assert config["package_name"] == "pi" and edge.json()["status"] == "active"
    assert (await world.http.post(f"{API}/deployments/{edge.json()['id']}/predict", json=BODY)).status_code == 401
    # The link opens that package for a browser without headers (storage is down here: 503, past the ticket check).
    link = await world.http.get(config["package_url"])
    assert link.status_code == 503

    # An export with deployments stays until they are deleted.
    await world.call("owner", "POST", f"{API}/export/jobs/{pending_export}/cancel")
    blocked = await world.call("owner", "DELETE", f"{API}/export/jobs/{world.ids['export']}")
    assert blocked.status_code == 409 and "deployment" in blocked.json()["detail"]
    listed = (await world.call("owner", "GET", f"{API}/export/deployments",
                               params={"training_job_id": job})).json()["deployments"]
    for item in listed:
        assert (await world.call("owner", "DELETE", f"{API}/export/deployments/{item['id']}")).status_code == 200
    assert (await world.call("owner", "DELETE", f"{API}/export/jobs/{world.ids['export']}")).status_code == 200


async def test_listing_without_a_job_shows_the_callers_projects_only(world: World) -> None:
    mine = (await world.call("member", "GET", f"{API}/export/deployments")).json()
    assert {item["id"] for item in mine["deployments"]} == {world.ids[name] for name in
                                                           ("deployment", "deployment_member", "deployment_owner")}
    assert (await world.call("stranger", "GET", f"{API}/export/deployments")).json() == {"total": 0, "deployments": []}
    # A stranger creating from, or switching, another project's objects meets "not found".
    made = await world.call("stranger", "POST", f"{API}/export/deployments", json={"export_job_id": world.ids["export"]})
    assert made.status_code == 404 and json.dumps(made.json()).count("export") >= 1
    assert (await world.call("viewer", "POST", f"{API}/export/deployments",
                             json={"export_job_id": world.ids["export"]})).status_code == 403
    await asyncio.to_thread(mark_export_completed, world, world.ids["export"])  # unchanged: still deployable
    assert (await world.call("member", "POST", f"{API}/export/deployments",
                             json={"export_job_id": world.ids["export"]})).status_code == 201
