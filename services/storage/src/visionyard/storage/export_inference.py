"""Storage's part in exports and inference: keep export packages and inference results the runners staged,
keep inference images the API staged (and delete them when the API releases them), and stage any
stored object by URI.

Additive to the storage service: it reuses the service's backend, staging area, publisher and
buckets. Packages and results go to the internal bucket, inference inputs to the external one (the
keys are in `keys.py`). Every handler is idempotent: a redelivered staged event rewrites the same key
and republishes the same (de-duplicated) stored event.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visionyard.shared.bus import PermanentError
from visionyard.shared.commands import DeleteUploads
from visionyard.shared.events import (
    ExportPackageStaged,
    ExportPackageStored,
    InferenceResultsStaged,
    InferenceResultsStored,
)
from visionyard.shared.requests import KeepUploadReply, KeepUploadRequest, StageObjectRequest, StageReply
from visionyard.storage.keys import (
    SAFE_ID,
    STAGEABLE_PREFIXES,
    export_package_key,
    inference_image_key,
    inference_results_key,
    inference_session_prefix,
    staged_object_name,
)
from visionyard.storage.ports import StagedObjectCorrupt, StagedObjectMissing
from visionyard.storage.service import StorageService

log = logging.getLogger("visionyard.storage.export_inference")

MAX_INFERENCE_IMAGE_BYTES = 50 * 1024 * 1024


class ExportInferenceStore:
    """The export and inference use cases over the storage service's ports."""

    def __init__(self, service: StorageService) -> None:
        self.service = service

    async def keep_staged(self, event: ExportPackageStaged | InferenceResultsStaged) -> None:
        """Copy a staged package/results file to the internal bucket, verify it, announce it stored."""
        if not SAFE_ID.match(event.job_id):
            raise PermanentError(f"job_id {event.job_id!r} is not usable as a storage key")
        service = self.service
        bucket = service.buckets.internal
        stored_type: type[ExportPackageStored] | type[InferenceResultsStored]
        if isinstance(event, ExportPackageStaged):
            key, stored_type = export_package_key(event.job_id), ExportPackageStored
        else:
            key, stored_type = inference_results_key(event.job_id), InferenceResultsStored
        if await asyncio.to_thread(service.backend.sha256, bucket, key) != event.sha256:
            try:
                await service.copy_staged(event.object_name, sha256=event.sha256, bucket=bucket, key=key)
            except (StagedObjectMissing, StagedObjectCorrupt) as error:
                raise PermanentError(str(error)) from error
        stored = stored_type(
            message_id=f"stored-{event.message_id}", job_id=event.job_id, attempt=event.attempt, seq=event.seq,
            training_job_id=event.training_job_id, uri=service.backend.uri(bucket, key), sha256=event.sha256,
            size_bytes=event.size_bytes,
        )
        await service.publisher.publish(stored)
        log.info("stored %s", key, extra={"job_id": event.job_id})

    async def keep_upload(self, request: KeepUploadRequest) -> KeepUploadReply:
        """Keep an uploaded inference image (it must decode) in the external bucket."""
        if not SAFE_ID.match(request.session_id):
            return KeepUploadReply(ok=False, error="invalid session_id")
        service = self.service
        with service._scratch() as scratch:
            local = Path(scratch) / "upload"
            try:
                await service.staging.fetch(request.object_name, local, sha256=request.sha256)
            except StagedObjectMissing:
                return KeepUploadReply(ok=False, error=f"{request.filename}: the upload is no longer available")
            except StagedObjectCorrupt:
                return KeepUploadReply(ok=False, error=f"{request.filename}: corrupted in transit (sha256 mismatch)")
            if local.stat().st_size > MAX_INFERENCE_IMAGE_BYTES:
                return KeepUploadReply(ok=False, error=f"{request.filename}: larger than {MAX_INFERENCE_IMAGE_BYTES} bytes")
            problem = await asyncio.to_thread(_image_problem, local)
            if problem:
                return KeepUploadReply(ok=False, error=f"{request.filename}: {problem}")
            bucket = service.buckets.external
            key = inference_image_key(request.session_id, request.filename)
            uri = await asyncio.to_thread(service.backend.put_file, bucket, key, local)
        return KeepUploadReply(ok=True, uri=uri, key=key)

    async def stage_object(self, request: StageObjectRequest) -> StageReply:
        """Put a stored object (inference input, package, results) into the staging object store."""
        service = self.service
        try:
            bucket, key = service.backend.parse_uri(request.uri)
        except ValueError as error:
            return StageReply(ok=False, error=str(error))
        if bucket not in (service.buckets.external, service.buckets.internal) or not key.startswith(STAGEABLE_PREFIXES):
            return StageReply(ok=False, error=f"{request.uri} is not a stageable Visionyard object")
        if not await asyncio.to_thread(service.backend.exists, bucket, key):
            return StageReply(ok=False, error=f"no such object: {request.uri}")
        # Named by the object's key hash: concurrent requests for one object share one staged copy.
        name = staged_object_name(bucket, key)
        with service._scratch() as scratch:
            local = await asyncio.to_thread(service.backend.get_file, bucket, key, Path(scratch) / "object")
            staged = await service.staging.stage(name, local)
        return StageReply(ok=True, object_name=staged.name, sha256=staged.sha256, size_bytes=staged.size_bytes,
                          uri=request.uri)


    async def delete_uploads(self, command: DeleteUploads) -> int:
        """Delete a session's uploaded images; how many keys were named. Idempotent (a missing key is fine).

        Only keys of that session in the external bucket are deleted: a key outside
        `inference/<session_id>/` is refused, never guessed at.
        """
        if not SAFE_ID.match(command.session_id):
            raise PermanentError(f"session_id {command.session_id!r} is not usable as a storage key")
        prefix = inference_session_prefix(command.session_id)
        for index, key in enumerate(command.keys):
            name = key[len(prefix):] if key.startswith(prefix) else ""
            if not name or "/" in name or name in (".", "..") or "\\" in name:
                raise PermanentError(f"keys[{index}] {key!r} is not an image of session {command.session_id}")
        bucket = self.service.buckets.external
        for key in command.keys:
            # The key is a whole object name (uuid hex + suffix): as a prefix it names that object only.
            await asyncio.to_thread(self.service.backend.delete_prefix, bucket, key)
        log.info("deleted %d uploaded image(s) of session %s", len(command.keys), command.session_id)
        return len(command.keys)


def _image_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return f"not a readable image ({type(error).__name__})"
