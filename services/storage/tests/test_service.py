"""The storage use cases with fakes for the staging area and publisher, over the local backend."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from visionyard.shared.commands import IngestDataset
from visionyard.shared.events import ArtifactStored, CheckpointStaged, DatasetReady, DatasetRejected
from visionyard.shared.messages import Message
from visionyard.shared.requests import PresignRequest, StageRequest
from visionyard.storage.adapters.local import LocalDirectoryBackend, PartialFileUpload
from visionyard.storage.ports import StagedObject, StagedObjectCorrupt, StagedObjectMissing
from visionyard.storage.service import Buckets, InvalidMessage, StorageService


class FakeStaging:
    """The staging object store as a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def fetch(self, name: str, destination: Path, *, sha256: str) -> Path:
        if name not in self.objects:
            raise StagedObjectMissing(name)
        if hashlib.sha256(self.objects[name]).hexdigest() != sha256:
            raise StagedObjectCorrupt(name)
        destination.write_bytes(self.objects[name])
        return destination

    async def read(self, name: str, *, sha256: str, chunk_size: int = 4) -> AsyncIterator[bytes]:
        if name not in self.objects:
            raise StagedObjectMissing(name)
        data = self.objects[name]
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StagedObjectCorrupt(name)  # like the bus: only after the last chunk

    async def stage(self, name: str, path: Path) -> StagedObject:
        self.objects[name] = path.read_bytes()
        return StagedObject(name, hashlib.sha256(self.objects[name]).hexdigest(), len(self.objects[name]))

    async def info(self, name: str) -> StagedObject | None:
        data = self.objects.get(name)
        return None if data is None else StagedObject(name, hashlib.sha256(data).hexdigest(), len(data))


class FakePublisher:
    """Keeps published messages, de-duplicated by message id like JetStream."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}

    async def publish(self, message: Message) -> None:
        self.messages.setdefault(message.message_id, message)


class CountingBackend(LocalDirectoryBackend):
    """The local backend, counting file uploads and streamed uploads."""

    puts = 0
    uploads = 0

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        self.puts += 1
        return super().put_file(bucket, key, path)

    def begin_upload(self, bucket: str, key: str) -> PartialFileUpload:
        self.uploads += 1
        return super().begin_upload(bucket, key)


def service_over(tmp_path: Path, backend: LocalDirectoryBackend, staging: FakeStaging) -> tuple[StorageService, FakePublisher]:
    """The use cases over `backend` (buckets `ext` and `int`, created) and `staging`, with a fake publisher."""
    backend.ensure_buckets(["ext", "int"])
    publisher = FakePublisher()
    service = StorageService(
        backend=backend, staging=staging, publisher=publisher, workdir=tmp_path / "work", buckets=Buckets("ext", "int")
    )
    return service, publisher


@pytest.fixture
def parts(tmp_path: Path) -> tuple[StorageService, CountingBackend, FakeStaging, FakePublisher]:
    backend, staging = CountingBackend(tmp_path / "root"), FakeStaging()
    service, publisher = service_over(tmp_path, backend, staging)
    return service, backend, staging, publisher


def staged_checkpoint(staging: FakeStaging, data: bytes, *, attempt: int = 1, seq: int = 1, kind: str = "best") -> CheckpointStaged:
    name = f"ckpt/job1/{attempt}/{seq}-{kind}.pt"
    staging.objects[name] = data
    return CheckpointStaged(
        job_id="job1", attempt=attempt, seq=seq, checkpoint_kind=kind, object_name=name,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), epoch=seq,
    )


async def test_checkpoint_is_stored_with_sidecar_and_announced(parts) -> None:
    service, backend, staging, publisher = parts
    event = staged_checkpoint(staging, b"weights-v1")
    stored = await service.store_checkpoint(event)
    assert stored is not None and stored.message_id == f"stored-{event.message_id}"
    assert Path(stored.uri.removeprefix("file://")).read_bytes() == b"weights-v1"
    sidecar = json.loads(backend.read_bytes("int", "checkpoints/job1/best.json") or b"{}")
    assert sidecar == {"attempt": 1, "seq": 1, "sha256": event.sha256, "size_bytes": 10, "epoch": 1, "uri": stored.uri}
    assert list(publisher.messages.values()) == [stored]


async def test_redelivered_checkpoint_is_copied_once_and_announced_once(parts) -> None:
    service, backend, staging, publisher = parts
    event = staged_checkpoint(staging, b"weights")
    await service.store_checkpoint(event)
    del staging.objects[event.object_name]  # even after its TTL a redelivery succeeds
    again = await service.store_checkpoint(event)
    assert again is not None and backend.uploads == 1
    assert len(publisher.messages) == 1


async def test_stale_attempt_never_overwrites_a_newer_checkpoint(parts) -> None:
    service, backend, staging, publisher = parts
    newer = staged_checkpoint(staging, b"attempt-2", attempt=2, seq=1)
    older = staged_checkpoint(staging, b"attempt-1", attempt=1, seq=9)
    await service.store_checkpoint(newer)
    assert await service.store_checkpoint(older) is None
    assert backend.read_bytes("int", "checkpoints/job1/best.pt") == b"attempt-2"
    assert [m.attempt for m in publisher.messages.values() if isinstance(m, ArtifactStored)] == [2]


async def test_vanished_staged_checkpoint_and_hostile_ids_are_permanent(parts) -> None:
    service, _, staging, _ = parts
    event = staged_checkpoint(staging, b"x")
    del staging.objects[event.object_name]
    with pytest.raises(StagedObjectMissing):
        await service.store_checkpoint(event)
    hostile = event.model_copy(update={"job_id": "../../etc"})
    with pytest.raises(InvalidMessage):
        await service.store_checkpoint(hostile)


async def test_corrupt_staged_checkpoint_is_never_stored_and_the_stored_one_stays(parts, tmp_path: Path) -> None:
    service, backend, staging, publisher = parts
    good = staged_checkpoint(staging, b"attempt-1 weights", seq=1)
    await service.store_checkpoint(good)
    sidecar_before = backend.read_bytes("int", "checkpoints/job1/best.json")
    corrupt = staged_checkpoint(staging, b"attempt-1 weights, later", seq=2)
    staging.objects[corrupt.object_name] = b"attempt-1 weights, lat3r"  # damaged after staging
    with pytest.raises(StagedObjectCorrupt):
        await service.store_checkpoint(corrupt)
    # Every byte was streamed before the mismatch showed, yet the key still holds the verified file.
    assert backend.read_bytes("int", "checkpoints/job1/best.pt") == b"attempt-1 weights"
    assert backend.read_bytes("int", "checkpoints/job1/best.json") == sidecar_before
    assert [m.seq for m in publisher.messages.values() if isinstance(m, ArtifactStored)] == [1]
    assert not list((tmp_path / "root" / "int" / ".uploads").iterdir())  # the partial was discarded


class FailingUploadBackend(CountingBackend):
    """The local backend whose streamed uploads break after some bytes (a crash, a dead endpoint)."""

    def begin_upload(self, bucket: str, key: str) -> PartialFileUpload:
        upload = super().begin_upload(bucket, key)
        written = 0

        def write(data: bytes) -> None:
            nonlocal written
            written += len(data)
            if written > 8:
                raise ConnectionError("endpoint went away")
            PartialFileUpload.write(upload, data)

        upload.write = write  # type: ignore[method-assign]
        return upload


async def test_upload_failing_midway_leaves_nothing_and_is_retried_whole(tmp_path: Path) -> None:
    backend = FailingUploadBackend(tmp_path / "root")
    backend.ensure_buckets(["ext", "int"])
    staging, publisher = FakeStaging(), FakePublisher()
    service = StorageService(
        backend=backend, staging=staging, publisher=publisher, workdir=tmp_path / "work", buckets=Buckets("ext", "int")
    )
    event = staged_checkpoint(staging, b"weights that take a while")
    with pytest.raises(ConnectionError):  # transient: the handler naks it for a redelivery
        await service.store_checkpoint(event)
    assert not backend.exists("int", "checkpoints/job1/best.pt")
    assert backend.read_bytes("int", "checkpoints/job1/best.json") is None and not publisher.messages
    assert not list((tmp_path / "root" / "int" / ".uploads").iterdir())
    healthy = StorageService(
        backend=CountingBackend(tmp_path / "root"), staging=staging, publisher=publisher, workdir=tmp_path / "work",
        buckets=Buckets("ext", "int"),
    )
    stored = await healthy.store_checkpoint(event)  # the redelivery
    assert stored is not None and backend.read_bytes("int", "checkpoints/job1/best.pt") == b"weights that take a while"


async def test_same_dataset_uploaded_twice_is_stored_once(parts, make_zip, flat_dataset) -> None:
    service, backend, staging, publisher = parts
    events = []
    for order in (flat_dataset, list(reversed(flat_dataset))):
        data = make_zip(order).read_bytes()
        staging.objects[f"upload/d1/{len(events)}.zip"] = data
        command = IngestDataset(
            dataset_id="d1", object_name=f"upload/d1/{len(events)}.zip", sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data), filename="pets.zip",
        )
        events.append(await service.ingest_dataset(command))
    first, second = events
    assert isinstance(first, DatasetReady) and isinstance(second, DatasetReady)
    assert first.content_hash == second.content_hash and first.uri == second.uri
    assert backend.puts == 1 + first.num_images  # the archive and each image's browse copy, once
    assert first.num_classes == 2 and first.class_counts == {"cats": 3, "dogs": 2}
    manifest = json.loads(backend.read_bytes("ext", f"datasets/d1/{first.content_hash}/manifest.json") or b"{}")
    assert manifest["num_images"] == 5 and manifest["uri"] == first.uri


async def test_rejected_upload_stores_nothing(parts, make_zip, images, tmp_path: Path) -> None:
    service, backend, staging, publisher = parts
    data = make_zip([("cats/a.png", images["png"]()), ("../evil.png", images["png"]())]).read_bytes()
    staging.objects["upload/d2/x.zip"] = data
    event = await service.ingest_dataset(
        IngestDataset(dataset_id="d2", object_name="upload/d2/x.zip", sha256=hashlib.sha256(data).hexdigest(),
                      size_bytes=len(data), filename="evil.zip")
    )
    assert isinstance(event, DatasetRejected) and "../evil.png" in event.reason
    assert backend.puts == 0 and not list((tmp_path / "root" / "ext").rglob("*"))
    assert list(publisher.messages) == [event.message_id]


async def test_expired_upload_is_rejected_with_a_clear_reason(parts) -> None:
    service, _, _, _ = parts
    event = await service.ingest_dataset(
        IngestDataset(dataset_id="d3", object_name="upload/d3/gone.zip", sha256="0" * 64, size_bytes=10, filename="a.zip")
    )
    assert isinstance(event, DatasetRejected) and "no longer available" in event.reason


async def test_stage_and_presign(parts, make_zip, flat_dataset) -> None:
    service, _, staging, _ = parts
    data = make_zip(flat_dataset).read_bytes()
    staging.objects["upload/d4/a.zip"] = data
    ready = await service.ingest_dataset(
        IngestDataset(dataset_id="d4", object_name="upload/d4/a.zip", sha256=hashlib.sha256(data).hexdigest(),
                      size_bytes=len(data), filename="a.zip")
    )
    assert isinstance(ready, DatasetReady)
    reply = await service.stage(StageRequest(dataset_id="d4", content_hash=ready.content_hash))
    assert reply.ok and reply.object_name == f"dataset/{ready.content_hash}.zip"
    assert hashlib.sha256(staging.objects[reply.object_name]).hexdigest() == reply.sha256
    missing = await service.stage(StageRequest(dataset_id="d4", content_hash="f" * 64))
    assert not missing.ok
    assert not (await service.stage(StageRequest(job_id="job9", checkpoint_kind="best"))).ok

    presigned = await service.presign(PresignRequest(uri=ready.uri))
    assert presigned.ok and presigned.url == ready.uri
    outside = await service.presign(PresignRequest(uri="file:///etc/passwd"))
    assert not outside.ok
