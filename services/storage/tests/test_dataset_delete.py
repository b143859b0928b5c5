"""Deleting a dataset's stored versions (`cmd.dataset.delete`) on both backends, and serving big images
through the staging object store instead of a NATS reply.

The delete tests run the use case on the local directory and on a real S3 endpoint (moto_server) and
look at the bucket afterwards: the unpinned versions' files are gone, the pinned ones still stage.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from pathlib import Path

import pytest
from PIL import Image

from visionyard.shared.commands import DeleteDataset, IngestDataset
from visionyard.shared.events import DatasetDeleted, DatasetReady, DatasetRejected
from visionyard.shared.requests import ReadImageRequest, StageRequest
from visionyard.storage.adapters.local import LocalDirectoryBackend
from visionyard.storage.adapters.s3 import S3Backend
from visionyard.storage.ports import ObjectBackend, StagedObject
from visionyard.storage.service import Buckets, InvalidMessage, StorageService

from .conftest import png_bytes
from .test_service import FakePublisher, FakeStaging


def noise_png(side: int) -> bytes:
    """An incompressible PNG (random pixels): `side` 820 gives about 2 MB."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def folder(seed: int, count: int = 3) -> list[tuple[str, bytes]]:
    """A two-class ImageFolder whose content (and so content hash) depends on `seed`."""
    return [
        (f"{label}/{i}.png", png_bytes(((seed * 50 + i * 7) % 256, index * 120, 40)))
        for index, label in enumerate(("cats", "dogs"))
        for i in range(count)
    ]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectBackend, Buckets]:
    """Each backend with fresh buckets."""
    suffix = uuid.uuid4().hex[:8]
    buckets = Buckets(external=f"ext-{suffix}", internal=f"int-{suffix}")
    backend: ObjectBackend
    if request.param == "local":
        backend = LocalDirectoryBackend(tmp_path / "root")
    else:
        backend = S3Backend(
            endpoint_url=request.getfixturevalue("s3_endpoint"), access_key_id="testing", secret_access_key="testing"
        )
    backend.ensure_buckets([buckets.external, buckets.internal])
    return backend, buckets


def build(store: tuple[ObjectBackend, Buckets], tmp_path: Path, staging: FakeStaging | None = None) -> tuple[
    StorageService, FakeStaging, FakePublisher
]:
    backend, buckets = store
    staging, publisher = staging or FakeStaging(), FakePublisher()
    service = StorageService(
        backend=backend, staging=staging, publisher=publisher, workdir=tmp_path / "work", buckets=buckets
    )
    return service, staging, publisher


async def ingest(
    service: StorageService, staging: FakeStaging, entries: list[tuple[str, bytes]], make_zip, *, dataset_id: str
) -> DatasetReady | DatasetRejected:
    data = make_zip(entries).read_bytes()
    name = f"upload/{dataset_id}/{uuid.uuid4().hex}.zip"
    staging.objects[name] = data
    event = await service.ingest_dataset(IngestDataset(
        dataset_id=dataset_id, object_name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        filename="upload.zip",
    ))
    assert isinstance(event, (DatasetReady, DatasetRejected))
    return event


def version_keys(backend: ObjectBackend, bucket: str, dataset_id: str, content_hash: str, filenames: list[str]) -> dict[str, bool]:
    """Whether each object of a stored version exists."""
    keys = [f"datasets/{dataset_id}/{content_hash}/{name}" for name in ("dataset.zip", "manifest.json", "images.json")]
    keys += [f"datasets/{dataset_id}/{content_hash}/files/{name}" for name in filenames]
    return {key: backend.exists(bucket, key) for key in keys}


async def test_delete_removes_every_unpinned_version_and_keeps_pinned_ones(store, tmp_path: Path, make_zip) -> None:
    backend, buckets = store
    service, staging, publisher = build(store, tmp_path)
    pinned = await ingest(service, staging, folder(1), make_zip, dataset_id="ds")
    dropped = await ingest(service, staging, folder(2), make_zip, dataset_id="ds")
    dropped_too = await ingest(service, staging, folder(3, count=4), make_zip, dataset_id="ds")
    neighbour = await ingest(service, staging, folder(2), make_zip, dataset_id="other")
    assert all(isinstance(e, DatasetReady) for e in (pinned, dropped, dropped_too, neighbour))
    names = [name for name, _ in folder(1)]

    command = DeleteDataset(dataset_id="ds", keep_hashes=[pinned.content_hash])
    event = await service.delete_dataset(command)

    assert sorted(event.deleted_hashes) == sorted([dropped.content_hash, dropped_too.content_hash])
    assert event.kept_hashes == [pinned.content_hash]
    assert publisher.messages[event.message_id] == event and event.subject() == "evt.dataset.ds.deleted"
    for gone in (dropped, dropped_too):
        assert not any(version_keys(backend, buckets.external, "ds", gone.content_hash, names).values())
        assert (await service.stage(StageRequest(dataset_id="ds", content_hash=gone.content_hash))).ok is False
    assert all(version_keys(backend, buckets.external, "ds", pinned.content_hash, names).values())
    # The same content under another dataset is that dataset's, and stays.
    assert all(version_keys(backend, buckets.external, "other", neighbour.content_hash, names).values())
    staged = await service.stage(StageRequest(dataset_id="ds", content_hash=pinned.content_hash))
    assert staged.ok and staging.objects[staged.object_name or ""]
    assert backend.list_folders(buckets.external, "datasets/ds/") == [pinned.content_hash]
    if isinstance(backend, LocalDirectoryBackend):  # no empty folders left behind either
        assert not (backend.root / buckets.external / "datasets" / "ds" / dropped.content_hash).exists()

    # Redelivered: nothing more to delete, the announcement keeps its message id (JetStream de-duplicates).
    again = await service.delete_dataset(command)
    assert again.message_id == event.message_id and again.deleted_hashes == []
    assert all(version_keys(backend, buckets.external, "ds", pinned.content_hash, names).values())

    # An upload of the deleted dataset that arrives later is refused and stores nothing.
    late = await ingest(service, staging, folder(9), make_zip, dataset_id="ds")
    assert isinstance(late, DatasetRejected) and "was deleted" in late.reason
    assert backend.list_folders(buckets.external, "datasets/ds/") == [pinned.content_hash]


async def test_delete_without_pins_leaves_nothing(store, tmp_path: Path, make_zip) -> None:
    backend, buckets = store
    service, staging, _ = build(store, tmp_path)
    ready = await ingest(service, staging, folder(4), make_zip, dataset_id="solo")
    assert isinstance(ready, DatasetReady)
    event = await service.delete_dataset(DeleteDataset(dataset_id="solo"))
    assert event.deleted_hashes == [ready.content_hash] and event.kept_hashes == []
    assert backend.list_folders(buckets.external, "datasets/solo/") == []
    assert not any(version_keys(backend, buckets.external, "solo", ready.content_hash, [n for n, _ in folder(4)]).values())


async def test_malformed_pins_or_ids_delete_nothing(tmp_path: Path, make_zip) -> None:
    backend = LocalDirectoryBackend(tmp_path / "root")
    store = (backend, Buckets("ext", "int"))
    backend.ensure_buckets(["ext", "int"])
    service, staging, publisher = build(store, tmp_path)
    ready = await ingest(service, staging, folder(5), make_zip, dataset_id="ds")
    assert isinstance(ready, DatasetReady)
    with pytest.raises(InvalidMessage, match=r"keep_hashes\[0\]"):
        await service.delete_dataset(DeleteDataset(dataset_id="ds", keep_hashes=["../../etc"]))
    with pytest.raises(InvalidMessage):
        await service.delete_dataset(DeleteDataset(dataset_id="../ds"))
    assert backend.list_folders("ext", "datasets/ds/") == [ready.content_hash]
    assert not any(isinstance(m, DatasetDeleted) for m in publisher.messages.values())


class DeletingWhileChecking(FakeStaging):
    """Staging whose fetch lets a delete of the dataset run while its upload is being checked."""

    def __init__(self) -> None:
        super().__init__()
        self.service: StorageService | None = None

    async def fetch(self, name: str, destination: Path, *, sha256: str) -> Path:
        fetched = await super().fetch(name, destination, sha256=sha256)
        if self.service is not None and name.startswith("upload/racing/"):
            await self.service.delete_dataset(DeleteDataset(dataset_id="racing"))
        return fetched


async def test_an_upload_checked_while_its_dataset_is_deleted_is_not_left_behind(
    store, tmp_path: Path, make_zip
) -> None:
    backend, buckets = store
    staging = DeletingWhileChecking()
    service, _, _ = build(store, tmp_path, staging)
    staging.service = service
    event = await ingest(service, staging, folder(6), make_zip, dataset_id="racing")
    assert isinstance(event, DatasetRejected) and "deleted while" in event.reason
    assert backend.list_folders(buckets.external, "datasets/racing/") == []


class CountingStaging(FakeStaging):
    """Counts how often something is put into staging."""

    stages = 0

    async def stage(self, name: str, path: Path) -> StagedObject:
        self.stages += 1
        return await super().stage(name, path)


async def test_big_images_are_staged_once_and_named_instead_of_refused(tmp_path: Path, make_zip) -> None:
    backend = LocalDirectoryBackend(tmp_path / "root")
    backend.ensure_buckets(["ext", "int"])
    staging = CountingStaging()
    service, _, _ = build((backend, Buckets("ext", "int")), tmp_path, staging)
    big = noise_png(820)
    assert len(big) > 1_900_000
    ready = await ingest(service, staging, [("cats/big.png", big), ("dogs/small.png", png_bytes())], make_zip, dataset_id="b")
    assert isinstance(ready, DatasetReady), ready

    request = ReadImageRequest(dataset_id="b", content_hash=ready.content_hash, filename="cats/big.png", stage_larger=True)
    reply = await service.read_image(request)
    assert reply.ok and reply.content_b64 is None and reply.content_type == "image/png"
    assert reply.object_name == f"browse/{ready.content_hash}/cats/big.png" and reply.size == len(big)
    assert staging.objects[reply.object_name] == big and reply.sha256 == hashlib.sha256(big).hexdigest()
    before = staging.stages
    assert (await service.read_image(request)).object_name == reply.object_name
    assert staging.stages == before  # a version's files never change: staged once, reused

    small = await service.read_image(request.model_copy(update={"filename": "dogs/small.png"}))
    assert small.ok and small.object_name is None and small.content_b64  # small ones stay inline
    refused = await service.read_image(request.model_copy(update={"stage_larger": False}))
    assert not refused.ok and "limited to" in (refused.error or "")  # what older API releases asked for
