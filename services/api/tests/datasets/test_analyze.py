"""`POST /datasets/analyze`: `path` names a dataset of the caller's projects (id, name, stored s3:// URI) and never
a file of the API host; every refusal names the field and says why, in `detail` and in `message` (what the
wizard shows)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from visionyard.api.db.models import Dataset
from visionyard.shared.bus import Bus

from ..access_world import API, MARKER, World, authenticated_settings, cheap_password_hashing, ready_dataset, world_of

pytestmark = pytest.mark.integration

ANALYZE = f"{API}/datasets/analyze"


@pytest.fixture
async def world(bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    """The served app (authentication on) with owner/member/viewer/stranger and the owner's ready dataset."""
    cheap_password_hashing(monkeypatch)
    settings = authenticated_settings(tmp_path)
    async with world_of(settings, bus) as built:
        yield built


def _refusal(answer: Any, status: int, field: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == "error" and body["message"] == body["detail"] and body["detail"].startswith(f"{field}:")
    return str(body["detail"])


async def test_a_dataset_is_named_by_id_name_or_stored_uri(world: World) -> None:
    dataset = world.ids["dataset"]
    by_id = await world.call("viewer", "POST", ANALYZE, json={"path": dataset, "format_hint": None})
    assert by_id.status_code == 200, by_id.text
    info = by_id.json()["dataset_info"]
    assert (info["dataset_id"], info["format"], info["num_images"], info["num_classes"]) == (dataset, "imagefolder", 30, 3)
    assert info["class_names"] == ["0", "1", "2"] and by_id.json()["status"] == "success"
    by_name = await world.call("viewer", "POST", ANALYZE, json={"path": f"{MARKER}-digits", "format_hint": "ImageFolder"})
    assert by_name.status_code == 200 and by_name.json()["dataset_info"]["dataset_id"] == dataset

    # On S3 a version's stored URI names it too (the bucket and key must be the dataset's own).
    def stored_on_s3() -> None:
        with world.app.state.session_factory() as session, session.begin():
            row = session.get(Dataset, dataset)
            assert row is not None
            row.uri = f"s3://visionyard-external/datasets/{dataset}/hash-1/dataset.zip"

    await asyncio.to_thread(stored_on_s3)
    by_uri = await world.call("viewer", "POST", ANALYZE,
                              json={"path": f"s3://visionyard-external/datasets/{dataset}/hash-1/dataset.zip"})
    assert by_uri.status_code == 200 and by_uri.json()["dataset_info"]["dataset_id"] == dataset
    folder = await world.call("viewer", "POST", ANALYZE, json={"path": f"s3://visionyard-external/datasets/{dataset}/"})
    assert folder.status_code == 200
    other_bucket = await world.call("viewer", "POST", ANALYZE, json={"path": f"s3://someone-else/datasets/{dataset}/"})
    _refusal(other_bucket, 404, "path")

    hint = await world.call("viewer", "POST", ANALYZE, json={"path": dataset, "format_hint": "yolo"})
    assert "imagefolder" in _refusal(hint, 422, "format_hint")


async def test_host_paths_are_refused_and_other_projects_look_missing(world: World) -> None:
    for path in ("/data/digits", "/etc/passwd", "~/datasets/x", "../../etc", "./local", "C:\\data\\cats",
                 "D:/data", "file:///etc/passwd", "digits/../../etc", "\\\\server\\share"):
        answer = await world.call("owner", "POST", ANALYZE, json={"path": path, "format_hint": None})
        assert "does not read paths on its host" in _refusal(answer, 422, "path"), path
    # Another project's dataset answers exactly as one that does not exist.
    hidden = await world.call("stranger", "POST", ANALYZE, json={"path": world.ids["dataset"]})
    nothing = await world.call("stranger", "POST", ANALYZE, json={"path": "0" * 32})
    assert _refusal(hidden, 404, "path").replace(world.ids["dataset"], "#") == \
        _refusal(nothing, 404, "path").replace("0" * 32, "#")
    assert MARKER not in hidden.text
    by_name = await world.call("stranger", "POST", ANALYZE, json={"path": f"{MARKER}-digits"})
    _refusal(by_name, 404, "path")
    assert (await world.call("anonymous", "POST", ANALYZE, json={"path": world.ids["dataset"]})).status_code == 401
    empty = await world.call("owner", "POST", ANALYZE, json={"path": ""})
    assert empty.status_code == 422 and "path" in empty.json()["detail"]


async def test_ambiguous_names_and_unready_datasets_are_explained(world: World) -> None:
    project = world.ids["project"]
    await ready_dataset(world, "owner", name="twin", project_id=project, content_hash="hash-2")
    await ready_dataset(world, "member", name="twin", project_id=project, content_hash="hash-3")
    twins = await world.call("member", "POST", ANALYZE, json={"path": "twin"})
    assert "2 datasets are named 'twin'" in _refusal(twins, 422, "path")
    empty = world.ids["empty_dataset_owner"]
    unready = await world.call("member", "POST", ANALYZE, json={"path": empty})
    assert f"dataset {empty} is empty" in _refusal(unready, 409, "path")
