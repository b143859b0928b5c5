"""The storage use cases: keep staged checkpoints, ingest datasets, stage stored files, presign URLs,
list and read a stored dataset version's images.

They take their ports (an object backend, the staging area, a publisher) as arguments and import no
framework. Backend calls block (boto3, file I/O), so they run in worker threads; the event loop stays
free to answer requests while an archive is being checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import mimetypes
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionyard.shared.commands import DeleteDataset, IngestDataset
from visionyard.shared.events import (
    ArtifactStored,
    CheckpointStaged,
    DatasetDeleted,
    DatasetEvent,
    DatasetReady,
    DatasetRejected,
)
from visionyard.shared.logs import bind
from visionyard.shared.requests import (
    CheckpointIncoming,
    ImageEntry,
    ListImagesReply,
    ListImagesRequest,
    PresignReply,
    PresignRequest,
    ReadImageReply,
    ReadImageRequest,
    StageReply,
    StageRequest,
)
from visionyard.storage.archive import ArchiveLimits, ArchiveRejected, InspectedDataset
from visionyard.storage.formats import inspect_dataset_archive
from visionyard.storage.incoming import IncomingCopies
from visionyard.storage.keys import (
    CONTENT_HASH,
    SAFE_ID,
    checkpoint_key,
    checkpoint_sidecar_key,
    dataset_archive_key,
    dataset_file_key,
    dataset_index_key,
    dataset_manifest_key,
    dataset_prefix,
    dataset_tombstone_key,
    dataset_version_prefix,
    staged_browse_name,
    staged_dataset_name,
    staged_resume_name,
)
from visionyard.storage.ports import (
    EventPublisher,
    ObjectBackend,
    StagedObjectCorrupt,
    StagedObjectMissing,
    StagingArea,
)

log = logging.getLogger("visionyard.storage")

class InvalidMessage(Exception):
    """A message names something that can never be stored (an id unusable as a key)."""


@dataclass(frozen=True)
class Buckets:
    """Where things go: datasets in the external bucket, checkpoints in the internal one."""

    external: str = "visionyard-external"
    internal: str = "visionyard-internal"


class StorageService:
    """The storage use cases over one backend, the staging area and the event publisher."""

    def __init__(
        self,
        *,
        backend: ObjectBackend,
        staging: StagingArea,
        publisher: EventPublisher,
        workdir: Path,
        buckets: Buckets | None = None,
        limits: ArchiveLimits | None = None,
    ) -> None:
        self.backend = backend
        self.staging = staging
        self.publisher = publisher
        self.workdir = workdir
        self.buckets = buckets or Buckets()
        self.limits = limits or ArchiveLimits()
        self.incoming = IncomingCopies(backend=backend, staging=staging)

    # -- checkpoints -----------------------------------------------------------------------------

    async def prefetch_checkpoint(self, hint: CheckpointIncoming) -> bool:
        """Start copying an announced checkpoint while the runner stages it (`incoming.py`); whether
        a copy started. It is only kept if the `checkpoint` event names the same bytes."""
        try:
            _require_safe_id(hint.job_id, "job_id")
            _require_safe_id(hint.checkpoint_kind, "checkpoint_kind")
        except InvalidMessage as error:
            log.warning("ignoring a checkpoint hint: %s", error)
            return False
        key = checkpoint_key(hint.job_id, hint.checkpoint_kind)
        return self.incoming.start(hint, bucket=self.buckets.internal, key=key)

    async def store_checkpoint(self, event: CheckpointStaged) -> ArtifactStored | None:
        """Copy a staged checkpoint into the internal bucket, verify it, and announce it.

        Returns the published `ArtifactStored`, or None when a newer (attempt, seq) of the same
        kind is already stored (a stale or reordered event must not overwrite it).
        """
        _require_safe_id(event.job_id, "job_id")
        _require_safe_id(event.checkpoint_kind, "checkpoint_kind")
        logger = bind(log, job_id=event.job_id, attempt=event.attempt, seq=event.seq)
        bucket = self.buckets.internal
        key = checkpoint_key(event.job_id, event.checkpoint_kind)
        sidecar_key = checkpoint_sidecar_key(event.job_id, event.checkpoint_kind)
        stored = await self._read_json(bucket, sidecar_key)
        if stored is not None and (stored["attempt"], stored["seq"]) > (event.attempt, event.seq):
            logger.info(
                "checkpoint %s is older than the stored one (attempt %s seq %s); not overwriting",
                event.checkpoint_kind, stored["attempt"], stored["seq"],
            )
            await self.incoming.discard(event.object_name)
            return None

        already = (
            stored is not None
            and stored.get("sha256") == event.sha256
            and await asyncio.to_thread(self.backend.exists, bucket, key)
        )
        how = ""
        if already:
            await self.incoming.discard(event.object_name)
            uri = self.backend.uri(bucket, key)
            size = int(stored["size_bytes"]) if stored else event.size_bytes
            how = " (already there)"
        else:
            copied = await self.incoming.claim(event, bucket=bucket, key=key)
            if copied is None:
                copied = await self.copy_staged(event.object_name, sha256=event.sha256, bucket=bucket, key=key)
            else:
                how = " (copied while it was staged)"
            uri, size = copied
        sidecar = {
            "attempt": event.attempt,
            "seq": event.seq,
            "sha256": event.sha256,
            "size_bytes": size,
            "epoch": event.epoch,
            "uri": uri,
        }
        if stored != sidecar:
            # Written after the verified file: a sidecar never describes bytes that are not there.
            await asyncio.to_thread(self.backend.write_bytes, bucket, sidecar_key, json.dumps(sidecar).encode())
        artifact = ArtifactStored(
            message_id=f"stored-{event.message_id}",
            job_id=event.job_id,
            attempt=event.attempt,
            seq=event.seq,
            checkpoint_kind=event.checkpoint_kind,
            uri=uri,
            sha256=event.sha256,
            size_bytes=size,
            epoch=event.epoch,
        )
        await self.publisher.publish(artifact)
        logger.info("stored checkpoint %s at %s%s", event.checkpoint_kind, uri, how)
        return artifact

    async def copy_staged(self, object_name: str, *, sha256: str, bucket: str, key: str) -> tuple[str, int]:
        """Stream a staged object into `bucket/key` as it is read; its URI and size.

        No local copy and no read-back: the staging area hashes the bytes as they pass and raises
        after the last chunk if they are not `sha256`, and only then is the upload completed, so a
        corrupt object, a crash or any error mid-copy leaves nothing new under the key (the upload is
        aborted; an interrupted S3 multipart upload is never completed).
        """
        upload = await asyncio.to_thread(self.backend.begin_upload, bucket, key)
        size = 0
        try:
            async with contextlib.aclosing(self.staging.read(object_name, sha256=sha256)) as chunks:
                async for chunk in chunks:
                    size += len(chunk)
                    await asyncio.to_thread(upload.write, chunk)
            uri = await asyncio.to_thread(upload.complete)
        except BaseException:
            try:
                await asyncio.to_thread(upload.abort)
            except Exception:  # the upload stays invisible either way; the original error matters
                log.warning("could not abort the upload of %s/%s", bucket, key, exc_info=True)
            raise
        return uri, size

    # -- datasets --------------------------------------------------------------------------------

    async def ingest_dataset(self, command: IngestDataset) -> DatasetEvent:
        """Check an uploaded archive; store it under its content hash or reject it; announce which."""
        _require_safe_id(command.dataset_id, "dataset_id")
        logger = bind(log, dataset_id=command.dataset_id)
        event = await self._check_and_store(command)
        await self.publisher.publish(event)
        if isinstance(event, DatasetRejected):
            logger.info("rejected dataset upload %s: %s", command.filename, event.reason)
        else:
            logger.info("dataset upload %s stored as version %s", command.filename, getattr(event, "content_hash", ""))
        return event

    async def _check_and_store(self, command: IngestDataset) -> DatasetEvent:
        # Deterministic id: a redelivered command announces its outcome once.
        message_id = f"ingest-{command.message_id}"

        def rejected(reason: str) -> DatasetRejected:
            return DatasetRejected(message_id=message_id, dataset_id=command.dataset_id, reason=reason)

        if await self._is_deleted(command.dataset_id):
            return rejected(f"dataset {command.dataset_id} was deleted; {command.filename} was not stored")
        if command.size_bytes > self.limits.max_upload_bytes:
            return rejected(
                f"{command.filename} is {command.size_bytes} bytes; uploads are limited to "
                f"{self.limits.max_upload_bytes} bytes"
            )
        with self._scratch() as scratch:
            upload = Path(scratch) / "upload.zip"
            try:
                await self.staging.fetch(command.object_name, upload, sha256=command.sha256)
            except StagedObjectMissing:
                return rejected(f"{command.filename}: the upload is no longer available; upload it again")
            except StagedObjectCorrupt:
                return rejected(f"{command.filename}: the upload was corrupted in transit (sha256 mismatch)")
            try:
                dataset = await asyncio.to_thread(
                    inspect_dataset_archive,
                    upload,
                    workdir=Path(scratch) / "normalized",
                    limits=self.limits,
                    label=command.filename,
                )
            except ArchiveRejected as rejection:
                return rejected(rejection.reason)
            bucket = self.buckets.external
            archive_key = dataset_archive_key(command.dataset_id, dataset.content_hash)
            manifest_key = dataset_manifest_key(command.dataset_id, dataset.content_hash)
            uri = self.backend.uri(bucket, archive_key)
            manifest = dataset.manifest() | {"uri": uri}
            # Same content twice → same hash → stored once. The manifest goes last: when it exists,
            # the archive it describes is complete.
            if not await asyncio.to_thread(self.backend.exists, bucket, manifest_key):
                await asyncio.to_thread(self.backend.put_file, bucket, archive_key, dataset.archive)
                await asyncio.to_thread(
                    self._store_browse_copies, command.dataset_id, dataset, scratch=Path(scratch) / "browse"
                )
                await asyncio.to_thread(
                    self.backend.write_bytes, bucket, manifest_key, json.dumps(manifest, indent=2).encode()
                )
        # Checked again after the write: a delete writes its marker before it lists the versions, so
        # either that listing sees this version or this check sees the marker; nothing is left behind.
        tombstone = await self._read_json(bucket, dataset_tombstone_key(command.dataset_id))
        if tombstone is not None:
            if dataset.content_hash not in tombstone.get("kept_hashes", []):
                await self._delete_version(command.dataset_id, dataset.content_hash)
            return rejected(f"dataset {command.dataset_id} was deleted while {command.filename} was being checked")
        return DatasetReady(message_id=message_id, dataset_id=command.dataset_id, **manifest)

    async def delete_dataset(self, command: DeleteDataset) -> DatasetDeleted:
        """Delete every stored version of a deleted dataset except `keep_hashes`; announce what went.

        Idempotent: a redelivered command finds less (or nothing) to delete and announces under the
        same message id, so JetStream keeps the first announcement.
        """
        _require_safe_id(command.dataset_id, "dataset_id")
        for index, content_hash in enumerate(command.keep_hashes):
            # Refuse rather than guess: a malformed pin must never let a pinned version be deleted.
            if not CONTENT_HASH.match(content_hash):
                raise InvalidMessage(f"keep_hashes[{index}] {content_hash!r} is not a content hash")
        logger = bind(log, dataset_id=command.dataset_id)
        bucket = self.buckets.external
        keep = set(command.keep_hashes)
        marker = {"message_id": command.message_id, "kept_hashes": sorted(keep), "occurred_at": command.occurred_at.isoformat()}
        # The marker goes first (see `_check_and_store`): an upload still being checked is then not kept.
        await asyncio.to_thread(
            self.backend.write_bytes, bucket, dataset_tombstone_key(command.dataset_id), json.dumps(marker).encode()
        )
        stored = await asyncio.to_thread(self.backend.list_folders, bucket, dataset_prefix(command.dataset_id))
        deleted = [content_hash for content_hash in stored if content_hash not in keep]
        for content_hash in deleted:
            await self._delete_version(command.dataset_id, content_hash)
        kept = sorted(keep & set(stored))
        if missing := sorted(keep - set(stored)):
            logger.warning("pinned version(s) %s were not in storage", ", ".join(missing))
        event = DatasetDeleted(
            message_id=f"deleted-{command.message_id}", dataset_id=command.dataset_id,
            deleted_hashes=deleted, kept_hashes=kept,
        )
        await self.publisher.publish(event)
        logger.info("deleted %d stored version(s) of dataset; kept %d pinned by jobs", len(deleted), len(kept))
        return event

    async def _delete_version(self, dataset_id: str, content_hash: str) -> None:
        bucket = self.buckets.external
        # The manifest first: without it the version is incomplete, so nothing stages it meanwhile.
        await asyncio.to_thread(self.backend.delete_prefix, bucket, dataset_manifest_key(dataset_id, content_hash))
        await asyncio.to_thread(self.backend.delete_prefix, bucket, dataset_version_prefix(dataset_id, content_hash))

    async def _is_deleted(self, dataset_id: str) -> bool:
        return await asyncio.to_thread(self.backend.exists, self.buckets.external, dataset_tombstone_key(dataset_id))

    # -- request-reply ---------------------------------------------------------------------------

    async def stage(self, request: StageRequest) -> StageReply:
        """Put a stored dataset version or a job's stored checkpoint into the staging object store."""
        if request.dataset_id and request.content_hash:
            return await self._stage_dataset(request.dataset_id, request.content_hash)
        if request.job_id and request.checkpoint_kind:
            return await self._stage_checkpoint(request.job_id, request.checkpoint_kind)
        return StageReply(ok=False, error="a stage request names a dataset version or a job's checkpoint")

    async def _stage_dataset(self, dataset_id: str, content_hash: str) -> StageReply:
        if not SAFE_ID.match(dataset_id) or not CONTENT_HASH.match(content_hash):
            return StageReply(ok=False, error="invalid dataset_id or content_hash")
        bucket = self.buckets.external
        key = dataset_archive_key(dataset_id, content_hash)
        if not await asyncio.to_thread(self.backend.exists, bucket, dataset_manifest_key(dataset_id, content_hash)):
            return StageReply(ok=False, error=f"no stored dataset {dataset_id} version {content_hash}")
        name = staged_dataset_name(content_hash)
        # Staged copies are shared by content hash: a second runner (or job) reuses the first's.
        staged = await self.staging.info(name)
        if staged is None:
            with self._scratch() as scratch:
                local = await asyncio.to_thread(self.backend.get_file, bucket, key, Path(scratch) / "dataset.zip")
                staged = await self.staging.stage(name, local)
        return StageReply(
            ok=True,
            object_name=staged.name,
            sha256=staged.sha256,
            size_bytes=staged.size_bytes,
            uri=self.backend.uri(bucket, key),
        )

    async def _stage_checkpoint(self, job_id: str, kind: str) -> StageReply:
        if not SAFE_ID.match(job_id) or not SAFE_ID.match(kind):
            return StageReply(ok=False, error="invalid job_id or checkpoint_kind")
        bucket = self.buckets.internal
        key = checkpoint_key(job_id, kind)
        sidecar = await self._read_json(bucket, checkpoint_sidecar_key(job_id, kind))
        if sidecar is None or not await asyncio.to_thread(self.backend.exists, bucket, key):
            return StageReply(ok=False, error="no stored checkpoint")
        with self._scratch() as scratch:
            local = await asyncio.to_thread(self.backend.get_file, bucket, key, Path(scratch) / "checkpoint.pt")
            staged = await self.staging.stage(staged_resume_name(job_id, kind), local)
        return StageReply(
            ok=True,
            object_name=staged.name,
            sha256=staged.sha256,
            size_bytes=staged.size_bytes,
            uri=self.backend.uri(bucket, key),
            epoch=sidecar.get("epoch"),
        )

    async def presign(self, request: PresignRequest) -> PresignReply:
        """A download URL for an object in one of our buckets."""
        try:
            bucket, key = self.backend.parse_uri(request.uri)
        except ValueError as error:
            return PresignReply(ok=False, error=str(error))
        if bucket not in (self.buckets.external, self.buckets.internal):
            return PresignReply(ok=False, error=f"{request.uri} is not in a Visionyard bucket")
        if not await asyncio.to_thread(self.backend.exists, bucket, key):
            return PresignReply(ok=False, error=f"no such object: {request.uri}")
        expires_in = max(1, min(request.expires_in, 7 * 24 * 3600))  # S3's SigV4 maximum is 7 days
        url = await asyncio.to_thread(lambda: self.backend.presign(request.uri, expires_in=expires_in))
        return PresignReply(ok=True, url=url)

    async def list_images(self, request: ListImagesRequest) -> ListImagesReply:
        """A page of a stored version's images, each with a presigned URL where the backend has them."""
        if not SAFE_ID.match(request.dataset_id) or not CONTENT_HASH.match(request.content_hash):
            return ListImagesReply(ok=False, error="invalid dataset_id or content_hash")
        bucket = self.buckets.external
        index = await self._read_index(request.dataset_id, request.content_hash)
        if index is None:
            return ListImagesReply(
                ok=False, not_found=True, error=f"no stored dataset {request.dataset_id} version {request.content_hash}"
            )
        if request.filename is not None:
            chosen = [item for item in index if item["filename"] == request.filename]
            if not chosen:
                return ListImagesReply(ok=False, not_found=True, error=f"no image {request.filename!r} in this version")
        else:
            offset = max(0, request.offset)
            chosen = index[offset : offset + max(0, min(request.limit, 1000))]
        presigned = bool(getattr(self.backend, "presigns_urls", False))
        expires_in = max(1, min(request.expires_in, 7 * 24 * 3600))

        def entries() -> list[ImageEntry]:
            listed = []
            for item in chosen:
                url = None
                if presigned:
                    key = dataset_file_key(request.dataset_id, request.content_hash, item["filename"])
                    url = self.backend.presign(self.backend.uri(bucket, key), expires_in=expires_in)
                listed.append(ImageEntry(filename=item["filename"], size=int(item["size"]), url=url))
            return listed

        images = await asyncio.to_thread(entries)
        return ListImagesReply(ok=True, total_images=len(index), images=images, presigned=presigned)

    async def read_image(self, request: ReadImageRequest) -> ReadImageReply:
        """One image's bytes (capped: they travel in a NATS reply), for backends without URLs."""
        if not SAFE_ID.match(request.dataset_id) or not CONTENT_HASH.match(request.content_hash):
            return ReadImageReply(ok=False, error="invalid dataset_id or content_hash")
        index = await self._read_index(request.dataset_id, request.content_hash)
        # Only names from the version's own index are read: the filename never builds a path by itself.
        entry = next((item for item in index or [] if item["filename"] == request.filename), None)
        if entry is None:
            return ReadImageReply(ok=False, not_found=True, error=f"no image {request.filename!r} in this version")
        key = dataset_file_key(request.dataset_id, request.content_hash, request.filename)
        content_type = mimetypes.guess_type(request.filename)[0] or "application/octet-stream"
        if int(entry["size"]) > request.max_bytes:
            if request.stage_larger:
                return await self._stage_browse_image(request, key=key, size=int(entry["size"]), content_type=content_type)
            return ReadImageReply(
                ok=False, error=f"{request.filename} is {entry['size']} bytes; served images are limited to {request.max_bytes}"
            )
        data = await asyncio.to_thread(self.backend.read_bytes, self.buckets.external, key)
        if data is None:
            return ReadImageReply(ok=False, not_found=True, error=f"no image {request.filename!r} in this version")
        return ReadImageReply(
            ok=True, content_b64=base64.b64encode(data).decode(), content_type=content_type, size=len(data)
        )

    async def _stage_browse_image(
        self, request: ReadImageRequest, *, key: str, size: int, content_type: str
    ) -> ReadImageReply:
        """Put a big image into the staging object store (once per version and path) and name it."""
        name = staged_browse_name(request.content_hash, request.filename)
        # A version's files never change, so an earlier staging of the same name is the same bytes.
        staged = await self.staging.info(name)
        if staged is None or staged.size_bytes != size:
            with self._scratch() as scratch:
                try:
                    local = await asyncio.to_thread(self.backend.get_file, self.buckets.external, key, Path(scratch) / "image")
                except FileNotFoundError:
                    return ReadImageReply(ok=False, not_found=True, error=f"no image {request.filename!r} in this version")
                staged = await self.staging.stage(name, local)
        return ReadImageReply(
            ok=True, object_name=staged.name, sha256=staged.sha256, size=staged.size_bytes, content_type=content_type
        )

    # -- internals -------------------------------------------------------------------------------

    def _store_browse_copies(self, dataset_id: str, dataset: InspectedDataset, *, scratch: Path) -> None:
        """Each image as its own object (so S3 can presign it) and the index of them; blocking."""
        bucket = self.buckets.external
        scratch.mkdir(parents=True, exist_ok=True)
        local = scratch / "image.bin"
        with zipfile.ZipFile(dataset.archive) as archive:
            for filename, _ in dataset.image_files:
                with archive.open(filename) as source, local.open("wb") as sink:
                    while chunk := source.read(1 << 20):
                        sink.write(chunk)
                self.backend.put_file(bucket, dataset_file_key(dataset_id, dataset.content_hash, filename), local)
        index = [{"filename": filename, "size": size} for filename, size in dataset.image_files]
        self.backend.write_bytes(bucket, dataset_index_key(dataset_id, dataset.content_hash), json.dumps(index).encode())

    async def _read_index(self, dataset_id: str, content_hash: str) -> list[dict[str, Any]] | None:
        data = await asyncio.to_thread(self.backend.read_bytes, self.buckets.external, dataset_index_key(dataset_id, content_hash))
        if data is None:
            return None
        loaded: list[dict[str, Any]] = json.loads(data)
        return loaded


    async def _read_json(self, bucket: str, key: str) -> dict[str, Any] | None:
        data = await asyncio.to_thread(self.backend.read_bytes, bucket, key)
        if data is None:
            return None
        loaded: dict[str, Any] = json.loads(data)
        return loaded

    def _scratch(self) -> tempfile.TemporaryDirectory[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=self.workdir, prefix=f"{uuid.uuid4().hex[:8]}-")


def _require_safe_id(value: str, field_name: str) -> None:
    if not SAFE_ID.match(value):
        raise InvalidMessage(f"{field_name} {value!r} is not usable as a storage key")
