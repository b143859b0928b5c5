"""Staging inputs from the storage service: datasets into a local cache, checkpoints for resume."""

from __future__ import annotations

import asyncio
import logging
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from visionyard.runner.ports import StagedCheckpoint
from visionyard.shared import subjects
from visionyard.shared.bus import Bus, PermanentError, TransientError
from visionyard.shared.commands import DatasetRef
from visionyard.shared.requests import StageReply, StageRequest

log = logging.getLogger("visionyard.runner.staging")

COMPLETE_MARKER = ".visionyard-complete"


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a zip, refusing absolute paths, `..` and links; `destination` appears only when complete."""
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                name = PurePosixPath(member.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts or (name.parts and name.parts[0].endswith(":")):
                    raise PermanentError(f"unsafe path in dataset archive: {member.filename!r}")
                # Unix mode bits live in the high 16 bits; 0o120000 marks a symlink.
                if (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise PermanentError(f"link in dataset archive: {member.filename!r}")
                target = partial.joinpath(*name.parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
    except zipfile.BadZipFile as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise PermanentError(f"dataset archive is not a zip: {error}") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / COMPLETE_MARKER).write_text("ok\n")
    shutil.rmtree(destination, ignore_errors=True)
    partial.rename(destination)


class BusStager:
    """Asks storage (`storage.stage`) to put files into the object store, then fetches them."""

    def __init__(self, bus: Bus, *, cache_dir: Path, request_timeout: float = 60.0) -> None:
        self._bus = bus
        self._cache = cache_dir
        self._timeout = request_timeout
        # One download per content hash even when two jobs on this runner need it at once.
        self._locks: dict[str, asyncio.Lock] = {}

    async def _stage(self, request: StageRequest) -> StageReply:
        raw = await self._bus.request(subjects.STORAGE_STAGE, request, timeout=self._timeout)
        return StageReply.model_validate_json(raw)

    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        """`<cache>/datasets/<content_hash>/`, downloaded and extracted once, reused afterwards."""
        if not dataset.content_hash or "/" in dataset.content_hash or dataset.content_hash.startswith("."):
            raise PermanentError(f"invalid dataset content hash {dataset.content_hash!r}")
        target = self._cache / "datasets" / dataset.content_hash
        lock = self._locks.setdefault(dataset.content_hash, asyncio.Lock())
        async with lock:
            if (target / COMPLETE_MARKER).exists():
                return target
            reply = await self._stage(StageRequest(dataset_id=dataset.dataset_id, content_hash=dataset.content_hash))
            if not reply.ok or not reply.object_name:
                raise TransientError(f"storage could not stage dataset {dataset.dataset_id}@{dataset.content_hash}: {reply.error}")
            archive = self._cache / "datasets" / f"{dataset.content_hash}.zip"
            await self._bus.get_file(reply.object_name, archive, sha256=reply.sha256)
            await asyncio.to_thread(safe_extract, archive, target)
            archive.unlink(missing_ok=True)
            return target

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        """The job's stored checkpoint, or None when storage has none (a fresh start)."""
        reply = await self._stage(StageRequest(job_id=job_id, checkpoint_kind=kind))
        if not reply.ok or not reply.object_name:
            log.info("no stored %s checkpoint to resume from: %s", kind, reply.error, extra={"job_id": job_id})
            return None
        path = destination / f"{kind}.pt"
        await self._bus.get_file(reply.object_name, path, sha256=reply.sha256)
        return StagedCheckpoint(path=path, epoch=reply.epoch)
