"""Copying an announced checkpoint while it is staged (`incoming.py`), with fakes for the staging area
and publisher over the local backend: what is kept, and everything that must throw the copy away."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from visionyard.shared.events import ArtifactStored, CheckpointStaged
from visionyard.shared.requests import CheckpointIncoming
from visionyard.storage.adapters.local import LocalDirectoryBackend, PartialFileUpload
from visionyard.storage.service import StorageService

from .test_service import FakePublisher, FakeStaging, service_over

KEY = "checkpoints/job1/best.pt"


class ArrivingStaging(FakeStaging):
    """The fake staging area, plus objects whose chunks arrive while they are "put"."""

    def __init__(self) -> None:
        super().__init__()
        self.arriving: dict[str, asyncio.Queue[bytes | None]] = {}
        self.ordinary_reads = 0

    def announce(self, object_id: str) -> asyncio.Queue[bytes | None]:
        """A queue the test feeds chunks into (None: the put failed and its chunks were purged)."""
        return self.arriving.setdefault(object_id, asyncio.Queue())

    async def read_incoming(self, object_id: str, size: int) -> AsyncIterator[bytes]:
        chunks = self.announce(object_id)
        read = 0
        while read < size:
            chunk = await asyncio.wait_for(chunks.get(), timeout=2.0)
            if chunk is None:
                raise RuntimeError(f"incoming object {object_id} stalled")
            read += len(chunk)
            yield chunk

    async def read(self, name: str, *, sha256: str, chunk_size: int = 4) -> AsyncIterator[bytes]:
        self.ordinary_reads += 1
        async for chunk in super().read(name, sha256=sha256, chunk_size=chunk_size):
            yield chunk


class RecordingBackend(LocalDirectoryBackend):
    """The local backend, keeping every streamed upload it began."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.uploads: list[PartialFileUpload] = []

    def begin_upload(self, bucket: str, key: str) -> PartialFileUpload:
        upload = super().begin_upload(bucket, key)
        self.uploads.append(upload)
        return upload


@pytest.fixture
def parts(tmp_path: Path) -> tuple[StorageService, RecordingBackend, ArrivingStaging, FakePublisher]:
    backend, staging = RecordingBackend(tmp_path / "root"), ArrivingStaging()
    service, publisher = service_over(tmp_path, backend, staging)
    return service, backend, staging, publisher


def hint_for(data: bytes, *, attempt: int = 1, seq: int = 1, object_id: str = "nuid1") -> CheckpointIncoming:
    return CheckpointIncoming(
        job_id="job1", attempt=attempt, seq=seq, checkpoint_kind="best",
        object_name=f"ckpt/job1/{attempt}/{seq}-best.pt", object_id=object_id, size_bytes=len(data),
    )


def event_for(staging: ArrivingStaging, data: bytes, *, attempt: int = 1, seq: int = 1) -> CheckpointStaged:
    """The `checkpoint` event of a finished put of `data` (the object is now in the staging area)."""
    name = f"ckpt/job1/{attempt}/{seq}-best.pt"
    staging.objects[name] = data
    return CheckpointStaged(
        job_id="job1", attempt=attempt, seq=seq, checkpoint_kind="best", object_name=name,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), epoch=seq,
    )


async def feed(chunks: asyncio.Queue[bytes | None], data: bytes, *, size: int = 3) -> None:
    for start in range(0, len(data), size):
        await chunks.put(data[start : start + size])
        await asyncio.sleep(0)


def partial_files(backend: RecordingBackend) -> list[Path]:
    return [upload.partial for upload in backend.uploads if upload.partial.exists()]


async def test_a_copy_made_while_staging_is_kept_when_the_event_names_its_bytes(parts) -> None:
    service, backend, staging, publisher = parts
    data = b"weights-" * 50
    assert await service.prefetch_checkpoint(hint_for(data))
    await feed(staging.announce("nuid1"), data)
    stored = await service.store_checkpoint(event_for(staging, data))
    assert stored is not None and backend.read_bytes("int", KEY) == data
    assert staging.ordinary_reads == 0  # not read a second time
    assert len(backend.uploads) == 1 and len(service.incoming) == 0
    assert [m for m in publisher.messages.values() if isinstance(m, ArtifactStored)] == [stored]


async def test_the_event_can_arrive_before_the_copy_has_read_everything(parts) -> None:
    service, backend, staging, _ = parts
    data = bytes(range(256)) * 4
    await service.prefetch_checkpoint(hint_for(data))
    chunks = staging.announce("nuid1")
    await chunks.put(data[:100])
    store = asyncio.create_task(service.store_checkpoint(event_for(staging, data)))
    await asyncio.sleep(0.05)
    assert not store.done()  # it waits for the copy instead of starting another
    await chunks.put(data[100:])
    assert await store is not None
    assert backend.read_bytes("int", KEY) == data and staging.ordinary_reads == 0


async def test_other_bytes_than_the_event_names_are_thrown_away_and_copied_again(parts) -> None:
    service, backend, staging, _ = parts
    announced, staged = b"a" * 64, b"b" * 64  # same size, other content
    await service.prefetch_checkpoint(hint_for(announced))
    await feed(staging.announce("nuid1"), announced)
    assert await service.store_checkpoint(event_for(staging, staged)) is not None
    assert backend.read_bytes("int", KEY) == staged
    assert staging.ordinary_reads == 1 and partial_files(backend) == []


async def test_a_failed_put_leaves_nothing_and_the_event_is_copied_the_ordinary_way(parts) -> None:
    service, backend, staging, _ = parts
    data = b"c" * 40
    await service.prefetch_checkpoint(hint_for(data))
    chunks = staging.announce("nuid1")
    await chunks.put(data[:10])
    await chunks.put(None)  # the runner's put failed; it puts the file again under a new id
    assert await service.store_checkpoint(event_for(staging, data)) is not None
    assert backend.read_bytes("int", KEY) == data
    assert staging.ordinary_reads == 1 and partial_files(backend) == []


async def test_an_unclaimed_copy_is_aborted_after_the_claim_window(parts) -> None:
    service, backend, staging, _ = parts
    service.incoming.claim_seconds = 0.05
    data = b"d" * 30
    await service.prefetch_checkpoint(hint_for(data))
    await feed(staging.announce("nuid1"), data)
    for _ in range(100):
        if len(service.incoming) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(service.incoming) == 0
    assert partial_files(backend) == [] and backend.read_bytes("int", KEY) is None


async def test_a_stale_event_aborts_the_copy_and_keeps_the_newer_checkpoint(parts) -> None:
    service, backend, staging, _ = parts
    newer = b"attempt-2"
    await service.store_checkpoint(event_for(staging, newer, attempt=2, seq=1))
    older = b"attempt-1" * 10
    await service.prefetch_checkpoint(hint_for(older, attempt=1, seq=9))
    await feed(staging.announce("nuid1"), older)
    assert await service.store_checkpoint(event_for(staging, older, attempt=1, seq=9)) is None
    assert backend.read_bytes("int", KEY) == newer
    assert len(service.incoming) == 0 and partial_files(backend) == []


async def test_hints_beyond_the_limit_and_with_unusable_ids_are_ignored(parts) -> None:
    service, _, staging, _ = parts
    data = b"e" * 10
    assert await service.prefetch_checkpoint(hint_for(data, seq=1, object_id="n1"))
    assert await service.prefetch_checkpoint(hint_for(data, seq=2, object_id="n2"))
    assert not await service.prefetch_checkpoint(hint_for(data, seq=3, object_id="n3"))  # MAX_INCOMING is 2
    assert not await service.prefetch_checkpoint(hint_for(data, seq=1, object_id="again"))  # already copying
    hostile = hint_for(data, seq=4).model_copy(update={"job_id": "../etc"})
    assert not await service.prefetch_checkpoint(hostile)
    await service.incoming.close()
    assert len(service.incoming) == 0


async def test_closing_aborts_copies_in_flight(parts) -> None:
    service, backend, staging, _ = parts
    data = b"f" * 30
    await service.prefetch_checkpoint(hint_for(data))
    await staging.announce("nuid1").put(data[:5])
    await asyncio.sleep(0.01)
    await service.incoming.close()
    assert partial_files(backend) == [] and backend.read_bytes("int", KEY) is None
