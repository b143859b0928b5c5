"""Dataset routes end to end in one process: the API plus a real storage service on a real broker.

A folder upload and a zip become versions that storage checks; splits, snapshots, image browsing
and deletion then work on the stored version, and hostile folder uploads are refused up front.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from visionyard.shared.bus import Bus
from visionyard.shared.scheduling import QueueRequest
from visionyard.storage.config import StorageSettings
from visionyard.storage.main import serve as serve_storage

from ..conftest import until
from ..test_api import _queued_requests

pytestmark = pytest.mark.integration

DATASETS = "/api/v1/datasets"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, seed * 90 % 256, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def storage(nats_server: Any, tmp_path: Path) -> AsyncIterator[StorageSettings]:
    """The storage service on the test broker, on a local-directory backend."""
    settings = StorageSettings(nats_url=nats_server.url, data_dir=tmp_path / "storage-data")
    stop = asyncio.Event()
    task = asyncio.create_task(serve_storage(settings, stop=stop))
    yield settings
    stop.set()
    await asyncio.wait_for(task, timeout=30)


async def create(client: httpx.AsyncClient, name: str = "pets") -> str:
    created = await client.post(DATASETS, json={"name": name, "visibility": "private"})
    assert created.status_code == 201, created.text
    return str(created.json()["dataset_id"])


async def settled(client: httpx.AsyncClient, dataset_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        body = (await client.get(f"{DATASETS}/{dataset_id}")).json()
        return body if body["status"] in ("ready", "rejected") else None

    return await until(done, timeout=60)


def folder(n_per_class: int = 4) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for label_index, label in enumerate(("cats", "dogs")):
        for i in range(n_per_class):
            files.append(("files", (f"pets/{label}/{i}.png", png(label_index * 10 + i), "image/png")))
    return files


async def test_folder_upload_is_ingested_then_split_snapshotted_browsed_and_deleted(
    client: httpx.AsyncClient, storage: StorageSettings, bus: Bus
) -> None:
    dataset_id = await create(client)
    accepted = await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=folder())
    assert accepted.status_code == 202, accepted.text
    ready = await settled(client, dataset_id)
    assert ready["status"] == "ready", ready
    assert ready["format"] == "imagefolder" and ready["num_images"] == 8 and ready["class_names"] == ["cats", "dogs"]
    version = ready["content_hash"]

    page = (await client.get(f"{DATASETS}/{dataset_id}/images", params={"limit": 3, "offset": 1})).json()
    assert page["total_images"] == 8 and len(page["images"]) == 3
    first = page["images"][0]
    assert first["filename"] == "cats/1.png" and first["size"] == len(png(1))
    content = await client.get(first["presigned_url"].removeprefix("http://api"))
    assert content.status_code == 200 and content.content == png(1) and content.headers["content-type"] == "image/png"
    url = (await client.get(f"{DATASETS}/{dataset_id}/images/dogs/3.png/url")).json()
    assert url["presigned_url"].endswith(f"/images/dogs/3.png/content?version={version}")
    missing = await client.get(f"{DATASETS}/{dataset_id}/images/dogs/99.png/url")
    assert missing.status_code == 404 and "dogs/99.png" in missing.json()["detail"]

    # Splits: auto is reproducible by seed; manual must place every image; partial fills in the rest.
    auto = (await client.post(f"{DATASETS}/{dataset_id}/split", json={"method": "auto", "default_ratio": [0.75, 0.25], "seed": 7})).json()
    assert auto["counts"] == {"train": 6, "val": 2} and auto["content_hash"] == version
    again = (await client.post(f"{DATASETS}/{dataset_id}/split", json={"method": "auto", "default_ratio": [0.75, 0.25], "seed": 7})).json()
    assert again["splits"] == auto["splits"]
    partial = (await client.post(f"{DATASETS}/{dataset_id}/split", json={
        "method": "partial", "default_ratio": [0.5, 0.5], "splits": {"val": ["cats/0.png", "dogs/0.png"]}})).json()
    assert {"cats/0.png", "dogs/0.png"} <= set(partial["splits"]["val"]) and partial["counts"] == {"train": 3, "val": 5}
    manual = await client.post(f"{DATASETS}/{dataset_id}/split", json={"method": "manual", "splits": {"train": ["cats/0.png"]}})
    assert manual.status_code == 422 and manual.json()["detail"].startswith("splits: 7 image(s) are in no split")
    unknown = await client.post(f"{DATASETS}/{dataset_id}/split", json={"method": "partial", "splits": {"val": ["cats/nope.png"]}})
    assert unknown.status_code == 422 and unknown.json()["detail"].startswith("splits.val[0]: 'cats/nope.png' is not an image")
    ratio = await client.post(f"{DATASETS}/{dataset_id}/split", json={"default_ratio": [0.9, 0.3]})
    assert ratio.status_code == 422 and ratio.json()["detail"].startswith("default_ratio:")
    stored = (await client.get(f"{DATASETS}/{dataset_id}/split")).json()
    assert stored["method"] == "partial" and stored["splits"] == partial["splits"]  # a refused request changed nothing

    # Snapshots name the current version; a duplicate tag is a conflict.
    snap = await client.post(f"{DATASETS}/{dataset_id}/snapshot", json={"version_tag": "v1", "description": "first"})
    assert snap.status_code == 201 and snap.json()["content_hash"] == version
    dup = await client.post(f"{DATASETS}/{dataset_id}/snapshot", json={"version_tag": "v1"})
    assert dup.status_code == 409 and "v1" in dup.json()["detail"]

    # A job pins this version; a re-upload makes a new version and the job keeps its pin.
    job = (await client.post("/api/v1/training/jobs", json={"config": {
        "framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
        "dataset_id": dataset_id, "epochs": 1}})).json()
    assert job["dataset_snapshot_id"] == version
    accepted = await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=folder(5))
    assert accepted.status_code == 202

    async def new_version() -> dict[str, Any] | None:
        body = (await client.get(f"{DATASETS}/{dataset_id}")).json()
        return body if body["status"] == "ready" and body["content_hash"] != version else None

    second = await until(new_version, timeout=60)
    assert second["num_images"] == 10
    assert (await client.get(f"/api/v1/training/jobs/{job['id']}")).json()["dataset_snapshot_id"] == version
    listing = (await client.get(f"{DATASETS}/{dataset_id}/snapshots")).json()
    assert [s["version_tag"] for s in listing["snapshots"]] == ["v1"]
    by_hash = {v["content_hash"]: v for v in listing["versions"]}
    assert by_hash[version]["pinned_by_jobs"] == 1 and by_hash[version]["tags"] == ["v1"]
    assert by_hash[second["content_hash"]]["current"] and not by_hash[version]["current"]
    old_image = await client.get(f"{DATASETS}/{dataset_id}/images", params={"version": version})
    assert old_image.json()["total_images"] == 8

    started = await client.post(f"/api/v1/training/jobs/{job['id']}/start")
    assert started.status_code == 200, started.text

    async def train_command() -> list[QueueRequest]:
        return await _queued_requests(bus, str(job["id"]))

    command = (await until(train_command))[-1].command
    # The job trains on the version it pinned, with that version's split (not the new upload's).
    assert command.dataset.content_hash == version and command.dataset.split == partial["splits"]
    refused = await client.delete(f"{DATASETS}/{dataset_id}")
    assert refused.status_code == 409 and str(job["id"]) in refused.json()["detail"]
    await client.post(f"/api/v1/training/jobs/{job['id']}/cancel")
    deleted = (await client.delete(f"{DATASETS}/{dataset_id}")).json()
    assert deleted["status"] == "success" and deleted["kept_versions"] == [version]  # what the frontend requires
    assert "finished jobs trained on them" in deleted["message"]
    assert (await client.get(f"{DATASETS}/{dataset_id}")).status_code == 404


async def test_yolo_zip_is_ingested_with_detection_stats(
    client: httpx.AsyncClient, storage: StorageSettings
) -> None:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.yaml", "nc: 2\nnames: [car, person]\n")
        for i in range(3):
            archive.writestr(f"images/train/{i}.png", png(i))
            archive.writestr(f"labels/train/{i}.txt", "0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n")
    dataset_id = await create(client, "roads")
    accepted = await client.post(f"{DATASETS}/{dataset_id}/upload", files={"file": ("roads.zip", buffer.getvalue(), "application/zip")})
    assert accepted.status_code == 202
    ready = await settled(client, dataset_id)
    assert ready["status"] == "ready", ready
    assert ready["format"] == "yolo" and ready["task_types"] == ["object_detection"]
    assert ready["class_counts"] == {"car": 3, "person": 3} and ready["splits"] == {"train": 3}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../escape.png", "files[0]: '../escape.png' leaves the folder"),
        ("/etc/passwd.png", "files[0]: '/etc/passwd.png' is an absolute path"),
        ("", "files[0]: must be a file part with a filename"),
    ],
)
async def test_hostile_folder_names_are_refused_before_anything_is_stored(
    client: httpx.AsyncClient, name: str, expected: str
) -> None:
    dataset_id = await create(client)
    refused = await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=[("files", (name, png(1), "image/png"))])
    assert refused.status_code == 422 and refused.json()["detail"].startswith(expected), refused.text
    assert (await client.get(f"{DATASETS}/{dataset_id}")).json()["status"] == "empty"


async def test_duplicate_folder_names_and_broken_images_are_refused(
    client: httpx.AsyncClient, storage: StorageSettings
) -> None:
    dataset_id = await create(client)
    files = folder() + [("files", ("pets/CATS/0.png", png(3), "image/png"))]
    duplicate = await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=files)
    assert duplicate.status_code == 422 and "uploaded twice" in duplicate.json()["detail"]
    files = folder() + [("files", ("pets/dogs/fake.png", b"\x89PNG\r\n\x1a\nnot an image", "image/png"))]
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=files)).status_code == 202
    rejected = await settled(client, dataset_id)
    assert rejected["status"] == "rejected" and rejected["content_hash"] is None
    assert rejected["rejection_reason"].startswith("pets/dogs/fake.png: not a readable image")
    listing = await client.get(f"{DATASETS}/{dataset_id}/images")  # nothing stored: an empty gallery, not an error
    assert listing.status_code == 200
    assert (listing.json()["total_images"], listing.json()["images"], listing.json()["content_hash"]) == (0, [], None)


async def test_folder_upload_with_coco_annotations_json(client: httpx.AsyncClient, storage: StorageSettings) -> None:
    dataset_id = await create(client)
    images = [{"id": i + 1, "file_name": f"{i}.png"} for i in range(3)]
    annotations = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 3, 3]} for i in range(3)]
    document = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "bolt"}]}
    files: list[tuple[str, tuple[str, bytes, str]]] = [
        ("files", (f"images/{i}.png", png(i), "image/png")) for i in range(3)
    ]
    files.append(("annotations", ("annotations.json", json.dumps(document).encode(), "application/json")))
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=files)).status_code == 202
    ready = await settled(client, dataset_id)
    assert ready["status"] == "ready", ready
    assert ready["format"] == "coco" and ready["class_counts"] == {"bolt": 3}
