"""The test panel's single-image path with authentication on: a session's images belong to whoever uploaded
them (only they, or an admin, may run or release them), releasing tells storage exactly which files to delete,
and bad input is refused naming the field."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from visionyard.api.db.models_exports import InferenceUpload
from visionyard.shared.bus import Bus
from visionyard.shared.requests import KeepUploadRequest

from ..access_world import API, PNG, World, authenticated_settings, cheap_password_hashing, world_of
from ..conftest import FakeServices
from ..export_inference_world import classify_as, released_uploads, runner_answering, serve_keep_upload

pytestmark = pytest.mark.integration

INFERENCE = f"{API}/test_inference/inference"


@pytest.fixture
async def world(bus: Bus, fake_services: FakeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> AsyncIterator[World]:
    """The served app (authentication on) with owner/member/viewer/stranger and storage keeping uploads."""
    cheap_password_hashing(monkeypatch)
    settings = authenticated_settings(tmp_path)
    async with world_of(settings, bus) as built:
        kept: list[KeepUploadRequest] = []
        await serve_keep_upload(fake_services, kept)
        yield built


async def _upload(world: World, role: str, session: str, name: str = "cat.png") -> dict[str, Any]:
    answer = await world.call(role, "POST", f"{INFERENCE}/upload-image", params={"session_id": session},
                              files={"file": (name, PNG, "image/png")})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["session_id"] == session and body["server_path"] == body["s3_uri"]
    return body


def _quick(world: World, server_path: str) -> dict[str, Any]:
    return {"training_job_id": world.ids["job"], "image_path": server_path, "top_k": 3, "confidence_threshold": 0.5}


async def test_a_sessions_images_are_their_uploaders(world: World, tmp_path: Path) -> None:
    session = str(uuid.uuid4())
    mine = await _upload(world, "member", session)
    await _upload(world, "member", session, "dog.png")
    theirs = await _upload(world, "owner", session)  # the same session id from another user: kept apart

    async with runner_answering(world.bus, tmp_path, classify_as("2", 2, 0.55)) as ran:
        answer = await world.call("member", "POST", f"{INFERENCE}/quick", params=_quick(world, mine["server_path"]))
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["predicted_label"] == "2" and result["task_type"] == "image_classification"
        assert result["inference_job_id"] and result["image_path"] == mine["server_path"]
        # Someone else's upload is not the caller's to run, even in the same project.
        foreign = await world.call("member", "POST", f"{INFERENCE}/quick", params=_quick(world, theirs["server_path"]))
        assert foreign.status_code == 422 and "image_path" in foreign.json()["detail"]
    single = [command for command in ran if command.inference_type == "single"]
    assert [(c.image_uris, c.top_k, c.confidence_threshold) for c in single] == [([mine["server_path"]], 3, 0.5)]
    # A viewer of the project may not run one; a stranger does not see the job.
    assert (await world.call("viewer", "POST", f"{INFERENCE}/quick", params=_quick(world, mine["server_path"]))).status_code == 403
    assert (await world.call("stranger", "POST", f"{INFERENCE}/quick", params=_quick(world, mine["server_path"]))).status_code == 404

    # Releasing releases the caller's own images only; storage is told exactly which.
    by_owner = await world.call("owner", "DELETE", f"{INFERENCE}/session/{session}")
    assert by_owner.status_code == 200 and by_owner.json()["deleted_files"] == 1
    by_member = await world.call("member", "DELETE", f"{INFERENCE}/session/{session}")
    assert by_member.status_code == 200 and by_member.json()["deleted_files"] == 2
    with world.app.state.session_factory() as db:
        assert db.scalars(select(InferenceUpload).where(InferenceUpload.session_id == session)).all() == []
    released = await released_uploads(world.bus, 2)
    assert [(c.session_id, len(c.keys)) for c in released] == [(session, 1), (session, 2)]
    assert released[0].keys == [theirs["s3_key"]] and mine["s3_key"] in released[1].keys


async def test_bad_input_is_refused_naming_the_field(world: World) -> None:
    for session in ("../etc", "a" * 65, "with space"):
        answer = await world.call("member", "POST", f"{INFERENCE}/upload-image", params={"session_id": session},
                                  files={"file": ("cat.png", PNG, "image/png")})
        assert answer.status_code == 422 and "session_id" in answer.json()["detail"], answer.text
    bad_release = await world.call("member", "DELETE", f"{INFERENCE}/session/bad!id")
    assert bad_release.status_code == 422 and "session_id" in bad_release.json()["detail"]
    text = await world.call("member", "POST", f"{INFERENCE}/upload-image", params={"session_id": "s1"},
                            files={"file": ("notes.txt", b"hello", "text/plain")})
    assert text.status_code == 422 and "notes.txt" in text.json()["detail"] and text.json()["detail"].startswith("file")
    missing = await world.call("member", "POST", f"{INFERENCE}/upload-image", params={"session_id": "s1"})
    assert missing.status_code == 422 and "file" in missing.json()["detail"]
    no_session = await world.call("member", "POST", f"{INFERENCE}/upload-image", files={"file": ("a.png", PNG, "image/png")})
    assert no_session.status_code == 422 and "session_id" in no_session.json()["detail"]
    upload = await _upload(world, "member", "s1")
    for params, field in (({"top_k": 0}, "top_k"), ({"confidence_threshold": 2}, "confidence_threshold"),
                          ({"checkpoint_path": "file:///elsewhere.pt"}, "checkpoint_path")):
        answer = await world.call("member", "POST", f"{INFERENCE}/quick",
                                  params={**_quick(world, upload["server_path"]), **params})
        assert answer.status_code in (404, 422) and field in answer.json()["detail"], answer.text
    with world.app.state.session_factory() as db:
        assert len(db.scalars(select(InferenceUpload)).all()) == 1  # only the one good upload was kept
