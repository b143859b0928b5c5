"""Storage's part in shipping models: keep export packages and inference results the runners staged,
keep inference images the API staged (and delete them when the API releases them), and stage any
stored object by URI.

Additive to the storage service: it reuses the service's backend, staging area, publisher and
buckets. Packages and results go to the internal bucket (`exports/<export_id>/package.zip`,
`results/<inference_id>/results.json`); inference inputs to the external bucket
(`inference/<session_id>/<unique>`). Every handler is idempotent: a redelivered staged event
rewrites the same key and republishes the same (de-duplicated) stored event.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from pathlib import Path, PurePosixPath

from nats.aio.msg import Msg
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus, PermanentError
from visionyard.shared.commands import DeleteUploads
from visionyard.shared.events import (
    ExportPackageStaged,
    ExportPackageStored,
    InferenceResultsStaged,
    InferenceResultsStored,
    KeepUploadReply,
    KeepUploadRequest,
    StageObjectRequest,
    StageReply,
    decode_ship_event,
)
from visionyard.storage.ports import StagedObjectCorrupt, StagedObjectMissing
from visionyard.storage.service import StorageService

log = logging.getLogger("visionyard.storage.shipping")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Only what the platform itself stores may be staged back out by URI.
STAGEABLE_PREFIXES = ("inference/", "exports/", "results/")
MAX_INFERENCE_IMAGE_BYTES = 50 * 1024 * 1024


def export_package_key(export_id: str) -> str:
    """Key of an export's package in the internal bucket."""
    return f"exports/{export_id}/package.zip"


def inference_results_key(inference_id: str) -> str:
    """Key of an inference job's results in the internal bucket."""
    return f"results/{inference_id}/results.json"


def inference_image_key(session_id: str, filename: str) -> str:
    """Key of an uploaded inference image: unique within its session, keeping the suffix."""
    suffix = PurePosixPath(filename).suffix.lower()[:10]
    return f"inference/{session_id}/{uuid.uuid4().hex}{suffix}"


class ShippingStore:
    """The shipping use cases over the storage service's ports."""

    def __init__(self, service: StorageService) -> None:
        self.service = service

    async def keep_staged(self, event: ExportPackageStaged | InferenceResultsStaged) -> None:
        """Copy a staged package/results file to the internal bucket, verify it, announce it stored."""
        if not _SAFE_ID.match(event.job_id):
            raise PermanentError(f"job_id {event.job_id!r} is not usable as a storage key")
        service = self.service
        bucket = service.buckets.internal
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
        if not _SAFE_ID.match(request.session_id):
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
        name = f"object/{hashlib.sha256(f'{bucket}/{key}'.encode()).hexdigest()}"
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
        if not _SAFE_ID.match(command.session_id):
            raise PermanentError(f"session_id {command.session_id!r} is not usable as a storage key")
        prefix = f"inference/{command.session_id}/"
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


async def serve_shipping(bus: Bus, service: StorageService, *, stop: asyncio.Event) -> None:
    """Answer the shipping requests and consume staged packages/results until `stop` is set."""
    store = ShippingStore(service)

    async def on_keep_upload(data: bytes) -> bytes:
        try:
            request = KeepUploadRequest.model_validate_json(data)
        except ValidationError as error:
            return KeepUploadReply(ok=False, error=f"invalid request: {error.errors()[0].get('msg')}").model_dump_json().encode()
        return (await store.keep_upload(request)).model_dump_json().encode()

    async def on_stage_object(data: bytes) -> bytes:
        try:
            request = StageObjectRequest.model_validate_json(data)
        except ValidationError as error:
            return StageReply(ok=False, error=f"invalid request: {error.errors()[0].get('msg')}").model_dump_json().encode()
        return (await store.stage_object(request)).model_dump_json().encode()

    async def on_staged(msg: Msg) -> None:
        try:
            event = decode_ship_event(msg.subject, msg.data)
        except ValueError as error:
            raise PermanentError(f"undecodable message: {error}") from error
        if not isinstance(event, (ExportPackageStaged, InferenceResultsStaged)):
            raise PermanentError(f"{msg.subject} is not a staged package/results event")
        await store.keep_staged(event)

    async def on_delete_uploads(msg: Msg) -> None:
        try:
            command = DeleteUploads.model_validate_json(msg.data)
        except ValidationError as error:
            raise PermanentError(f"undecodable upload delete: {error}") from error
        await store.delete_uploads(command)

    subscriptions = [
        await bus.serve(subjects.STORAGE_KEEP_UPLOAD, on_keep_upload, queue="storage"),
        await bus.serve(subjects.STORAGE_STAGE_OBJECT, on_stage_object, queue="storage"),
    ]
    try:
        await asyncio.gather(
            bus.consume(streams.STORAGE_SHIPPED, on_staged, stop=stop, batch=1),
            bus.consume(streams.STORAGE_UPLOAD_DELETE, on_delete_uploads, stop=stop, batch=10),
        )
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
