"""A runner stages a dataset version once: later jobs on the same content hash reuse its local cache."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import pytest

from visionyard.runner.adapters.staging import BusStager
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import DatasetRef
from visionyard.shared.events import StageReply, StageRequest

pytestmark = pytest.mark.integration


async def test_second_job_on_the_same_version_does_not_stage_again(bus: Bus, tmp_path: Path) -> None:
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("cats/a.png", b"a")
        zipped.writestr("dogs/b.png", b"b")
    sha256, size = await bus.put_file("dataset/" + "a" * 64 + ".zip", archive)
    asked: list[StageRequest] = []

    async def storage(data: bytes) -> bytes:
        asked.append(StageRequest.model_validate_json(data))
        return StageReply(ok=True, object_name="dataset/" + "a" * 64 + ".zip", sha256=sha256, size_bytes=size).model_dump_json().encode()

    await bus.serve(subjects.STORAGE_STAGE, storage, queue="storage")
    stager = BusStager(bus, cache_dir=tmp_path / "cache")
    ref = DatasetRef(dataset_id="d1", content_hash="a" * 64)
    # Two jobs at once, then a third later: one request to storage in all.
    first, second = await asyncio.gather(stager.stage_dataset(ref), stager.stage_dataset(ref))
    third = await stager.stage_dataset(ref)
    assert first == second == third
    assert (third / "cats" / "a.png").read_bytes() == b"a"
    assert len(asked) == 1
    # A fresh stager on the same cache (a restarted runner) reuses it too.
    await BusStager(bus, cache_dir=tmp_path / "cache").stage_dataset(ref)
    assert len(asked) == 1
    other = DatasetRef(dataset_id="d1", content_hash="b" * 64)
    assert await stager.stage_dataset(other) != third
    assert len(asked) == 2 and asked[1].content_hash == "b" * 64  # a different version is staged on its own
