"""Staging from storage: a dataset version is staged once (later jobs on the same content hash reuse the local
cache), and an archive cannot write outside its directory."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import pytest

from visionyard.runner.adapters.staging import BusStager, safe_extract
from visionyard.shared import subjects
from visionyard.shared.bus import Bus, PermanentError
from visionyard.shared.commands import DatasetRef
from visionyard.shared.requests import StageReply, StageRequest

from ..fakes import answering


@pytest.mark.integration
async def test_second_job_on_the_same_version_does_not_stage_again(bus: Bus, tmp_path: Path) -> None:
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("cats/a.png", b"a")
        zipped.writestr("dogs/b.png", b"b")
    sha256, size = await bus.put_file("dataset/" + "a" * 64 + ".zip", archive)
    asked: list[StageRequest] = []

    async def storage(request: StageRequest) -> StageReply:
        asked.append(request)
        return StageReply(ok=True, object_name="dataset/" + "a" * 64 + ".zip", sha256=sha256, size_bytes=size)

    async with answering(bus, "storage", {subjects.STORAGE_STAGE: storage}):
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


def test_safe_extract_rejects_path_traversal(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("a/ok.txt", "fine")
        bundle.writestr("../escape.txt", "bad")
    with pytest.raises(PermanentError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()
