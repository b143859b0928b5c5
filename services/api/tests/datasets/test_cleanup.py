"""What DELETE /datasets/{id} does to storage, and browsing images too big for a NATS reply.

The API and a real storage service (local-directory backend) on a real broker: after a delete the
unpinned versions' files are gone from storage's directory and the pinned one is still there; a 2 MB
PNG is served whole through the staging object store.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from visionyard.api.config import ApiSettings
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import DatasetDeleted
from visionyard.storage.config import StorageSettings

from ..conftest import until
from .test_datasets import DATASETS, create, folder, png, settled, storage  # noqa: F401  (storage: fixture)

pytestmark = pytest.mark.integration


def noise_png(side: int = 820) -> bytes:
    """An incompressible PNG of random pixels (side 820: about 2 MB)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def version_dir(storage_settings: StorageSettings, dataset_id: str, content_hash: str) -> Path:
    """Where the local backend keeps one stored version."""
    return storage_settings.storage_root / storage_settings.external_bucket / "datasets" / dataset_id / content_hash


async def test_delete_removes_unpinned_versions_from_storage_and_keeps_the_pinned_one(
    client: httpx.AsyncClient, storage: StorageSettings, bus: Bus  # noqa: F811
) -> None:
    dataset_id = await create(client)
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=folder(3))).status_code == 202
    first = (await settled(client, dataset_id))["content_hash"]
    job = await client.post("/api/v1/training/jobs", json={"config": {
        "framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
        "dataset_id": dataset_id, "epochs": 1}})
    assert job.status_code == 201 and job.json()["dataset_snapshot_id"] == first
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=folder(4))).status_code == 202

    async def second_version() -> str | None:
        body = (await client.get(f"{DATASETS}/{dataset_id}")).json()
        return body["content_hash"] if body["status"] == "ready" and body["content_hash"] != first else None

    second = await until(second_version, timeout=60)
    assert (version_dir(storage, dataset_id, first) / "dataset.zip").is_file()
    assert (version_dir(storage, dataset_id, second) / "dataset.zip").is_file()

    events = await bus.nc.subscribe(subjects.dataset_event(dataset_id, "deleted"))
    deleted = await client.delete(f"{DATASETS}/{dataset_id}")
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["kept_versions"] == [first] and body["deleted_versions"] == [second]
    assert "stay in storage" in body["message"]

    announced = DatasetDeleted.model_validate_json((await events.next_msg(timeout=60)).data)
    assert announced.deleted_hashes == [second] and announced.kept_hashes == [first]
    assert not version_dir(storage, dataset_id, second).exists()
    assert (version_dir(storage, dataset_id, first) / "dataset.zip").is_file()
    assert (version_dir(storage, dataset_id, first) / "files" / "cats" / "0.png").read_bytes() == png(0)
    assert (await client.get(f"{DATASETS}/{dataset_id}")).status_code == 404


async def test_a_2mb_image_is_served_whole_on_the_local_backend(
    client: httpx.AsyncClient, storage: StorageSettings, settings: ApiSettings  # noqa: F811
) -> None:
    big = noise_png()
    assert len(big) > 1_900_000  # well over what a NATS reply can carry
    dataset_id = await create(client)
    files: list[tuple[str, tuple[str, bytes, str]]] = [
        ("files", ("photos/wide/big.png", big, "image/png")),
        ("files", ("photos/wide/small.png", png(1), "image/png")),
        ("files", ("photos/tall/small.png", png(2), "image/png")),
    ]
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=files)).status_code == 202
    ready = await settled(client, dataset_id)
    assert ready["status"] == "ready", ready

    listed = (await client.get(f"{DATASETS}/{dataset_id}/images")).json()
    by_name = {image["filename"]: image for image in listed["images"]}
    assert by_name["wide/big.png"]["size"] == len(big)
    for _ in range(2):  # the second view reuses what storage staged the first time
        served = await client.get(by_name["wide/big.png"]["presigned_url"].removeprefix("http://api"))
        assert served.status_code == 200, served.text
        assert served.content == big and served.headers["content-type"] == "image/png"
    small = await client.get(by_name["tall/small.png"]["presigned_url"].removeprefix("http://api"))
    assert small.status_code == 200 and small.content == png(2)

    spool = settings.data_dir / "tmp" / "images"
    assert not any(spool.iterdir()), "a served image's spooled copy must be deleted after sending"


async def test_deleted_dataset_event_is_projected_without_a_dead_letter(
    client: httpx.AsyncClient, storage: StorageSettings, bus: Bus  # noqa: F811
) -> None:
    dataset_id = await create(client)
    assert (await client.post(f"{DATASETS}/{dataset_id}/upload-images", files=folder(2))).status_code == 202
    await settled(client, dataset_id)
    events = await bus.nc.subscribe(subjects.dataset_event(dataset_id, "deleted"))
    dead = await bus.nc.subscribe(subjects.dead_letter("api-projector"))
    assert (await client.delete(f"{DATASETS}/{dataset_id}")).json()["kept_versions"] == []
    announced: Any = DatasetDeleted.model_validate_json((await events.next_msg(timeout=60)).data)
    assert len(announced.deleted_hashes) == 1 and announced.kept_hashes == []

    async def projected() -> bool | None:
        info = await bus.js.consumer_info("EVENTS", "api-projector")
        return True if info.num_pending == 0 and info.num_ack_pending == 0 else None

    await until(projected, timeout=30)
    assert dead.pending_msgs == 0
