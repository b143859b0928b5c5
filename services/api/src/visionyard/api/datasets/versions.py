"""Dataset version use cases: split configuration, named snapshots, image browsing, safe deletion.

A version is immutable and keyed by its content hash; splits and snapshots attach to a version, so a
re-upload (a new hash) starts with neither and never changes what an existing job pinned.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from visionyard.api.datasets import schemas
from visionyard.api.datasets.splits import check_ratio, resolve_split
from visionyard.api.db.models import Dataset, DatasetVersion, TrainingJob, utcnow
from visionyard.api.db.models_datasets import DatasetSnapshot, DatasetSplit
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, NotFound, TooLarge, Unavailable
from visionyard.api.jobstate import ACTIVE
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.shared.commands import DeleteDataset
from visionyard.shared.requests import ListImagesReply, ListImagesRequest, ReadImageReply, ReadImageRequest

ACTIVE_STATUSES = tuple(sorted(str(status) for status in ACTIVE))
PAGE = 1000


class DatasetStorage(Protocol):
    """Storage's answers about a stored version's images."""

    async def list_images(self, request: ListImagesRequest) -> ListImagesReply:
        """A page of images (or one, by filename)."""
        ...

    async def read_image(self, request: ReadImageRequest) -> ReadImageReply:
        """One image's bytes."""
        ...

    async def fetch_staged(self, object_name: str, destination: Path, *, sha256: str | None) -> Path:
        """Copy an image storage staged (too big for a reply) to a local file, verifying its sha256."""
        ...


@dataclass(frozen=True)
class ServedImage:
    """One image to send: its bytes (small images) or a spooled file the response streams, then deletes."""

    content_type: str
    data: bytes | None = None
    path: Path | None = None


def split_for_version(session: Session, *, dataset_id: str, content_hash: str) -> dict[str, list[str]] | None:
    """The stored split assignment of a version (what a job pinned to it trains with), or None."""
    row = session.scalar(
        select(DatasetSplit).where(DatasetSplit.dataset_id == dataset_id, DatasetSplit.content_hash == content_hash)
    )
    return None if row is None else {key: list(value) for key, value in row.assignment.items()}


class DatasetVersionService:
    """Splits, snapshots, images and deletion of dataset versions."""

    def __init__(
        self,
        *,
        uow: UnitOfWork,
        storage: DatasetStorage,
        inline_image_bytes: int = 256 * 1024,
        spool_dir: Path | None = None,
    ) -> None:
        self._uow = uow
        self._storage = storage
        # Images up to this size come back inside storage's NATS reply (base64, under the broker's
        # 1 MB message limit); bigger ones come through the staging object store.
        self._inline_bytes = inline_image_bytes
        self._spool_dir = spool_dir or Path(tempfile.gettempdir()) / "visionyard-api-images"

    # -- reading ----------------------------------------------------------------------------------

    def _awaiting_first_version(self, dataset_id: str) -> bool:
        with self._uow.read() as session:
            dataset = session.get(Dataset, dataset_id)
            return dataset is not None and dataset.content_hash is None

    def _ready_version(self, dataset_id: str, version: str | None = None) -> tuple[Dataset, str]:
        with self._uow.read() as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise NotFound(f"dataset_id: dataset {dataset_id} not found")
            if version is None:
                if dataset.content_hash is None:
                    raise Conflict(f"dataset {dataset_id} has no stored version yet (status {dataset.status})")
                return dataset, dataset.content_hash
            exists = session.scalar(
                select(DatasetVersion.id).where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.content_hash == version)
            )
            if exists is None:
                raise NotFound(f"version: dataset {dataset_id} has no version {version}")
            return dataset, version

    async def _all_filenames(self, dataset_id: str, content_hash: str) -> list[str]:
        names: list[str] = []
        while True:
            reply = await self._storage.list_images(
                ListImagesRequest(dataset_id=dataset_id, content_hash=content_hash, offset=len(names), limit=PAGE)
            )
            if not reply.ok:
                raise Unavailable(f"storage could not list dataset {dataset_id} version {content_hash}: {reply.error}")
            names += [image.filename for image in reply.images]
            if not reply.images or len(names) >= reply.total_images:
                return names

    # -- split ------------------------------------------------------------------------------------

    async def set_split(self, dataset_id: str, request: schemas.SplitRequest) -> schemas.SplitResponse:
        """Resolve and store the current version's split (replacing an earlier one for that version)."""
        check_ratio(request.default_ratio)
        _, content_hash = await asyncio.to_thread(self._ready_version, dataset_id)
        filenames = await self._all_filenames(dataset_id, content_hash)
        assignment = resolve_split(
            filenames, method=request.method, ratio=request.default_ratio, seed=request.seed, requested=request.splits
        )
        return await asyncio.to_thread(self._store_split, dataset_id, content_hash, request, assignment)

    def _store_split(
        self, dataset_id: str, content_hash: str, request: schemas.SplitRequest, assignment: dict[str, list[str]]
    ) -> schemas.SplitResponse:
        with self._uow.transaction() as session:
            row = session.scalar(
                select(DatasetSplit).where(DatasetSplit.dataset_id == dataset_id, DatasetSplit.content_hash == content_hash)
            )
            if row is None:
                row = DatasetSplit(dataset_id=dataset_id, content_hash=content_hash, created_at=utcnow())
                session.add(row)
            row.method = request.method
            row.default_ratio = list(request.default_ratio)
            row.seed = request.seed
            row.requested = dict(request.splits or {})
            row.assignment = assignment
            row.updated_at = utcnow()
            session.flush()
            return _split_response(row)

    def get_split(self, dataset_id: str, version: str | None = None) -> schemas.SplitResponse:
        """The split of the current (or a named) version; 404 when none was configured."""
        _, content_hash = self._ready_version(dataset_id, version)
        with self._uow.read() as session:
            row = session.scalar(
                select(DatasetSplit).where(DatasetSplit.dataset_id == dataset_id, DatasetSplit.content_hash == content_hash)
            )
            if row is None:
                raise NotFound(
                    f"split: dataset {dataset_id} version {content_hash} has no split configured "
                    "(the trainer then uses the archive's own train/val folders, or its val_split)"
                )
            return _split_response(row)

    # -- snapshots --------------------------------------------------------------------------------

    def create_snapshot(self, dataset_id: str, request: schemas.SnapshotRequest) -> schemas.SnapshotResponse:
        """Name the current version; 409 when the tag is taken."""
        _, content_hash = self._ready_version(dataset_id)
        try:
            with self._uow.transaction() as session:
                count = session.scalar(
                    select(func.count()).select_from(DatasetSnapshot).where(DatasetSnapshot.dataset_id == dataset_id)
                ) or 0
                tag = request.version_tag or f"v{count + 1}"
                taken = session.scalar(
                    select(DatasetSnapshot.id).where(DatasetSnapshot.dataset_id == dataset_id, DatasetSnapshot.version_tag == tag)
                )
                if taken is not None:
                    raise Conflict(f"version_tag: dataset {dataset_id} already has a snapshot tagged {tag!r}")
                row = DatasetSnapshot(
                    dataset_id=dataset_id, content_hash=content_hash, version_tag=tag,
                    description=request.description, created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                return _snapshot_response(row)
        except IntegrityError:  # a concurrent request took the tag between our check and insert
            raise Conflict(f"version_tag: dataset {dataset_id} already has a snapshot tagged {request.version_tag!r}") from None

    def list_snapshots(self, dataset_id: str) -> schemas.SnapshotListResponse:
        """Named snapshots (newest first) and every stored version with the jobs pinning it."""
        with self._uow.read() as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise NotFound(f"dataset_id: dataset {dataset_id} not found")
            snapshots = session.scalars(
                select(DatasetSnapshot).where(DatasetSnapshot.dataset_id == dataset_id)
                .order_by(DatasetSnapshot.created_at.desc(), DatasetSnapshot.id.desc())
            ).all()
            pins: dict[str, int] = {snapshot: count for snapshot, count in session.execute(
                select(TrainingJob.dataset_snapshot_id, func.count()).where(TrainingJob.dataset_id == dataset_id)
                .group_by(TrainingJob.dataset_snapshot_id)
            ).all()}
            versions = session.scalars(
                select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id).order_by(DatasetVersion.id.desc())
            ).all()
            return schemas.SnapshotListResponse(
                dataset_id=dataset_id,
                snapshots=[_snapshot_response(row) for row in snapshots],
                versions=[
                    schemas.VersionResponse(
                        content_hash=version.content_hash, created_at=version.created_at,
                        format=(version.stats or {}).get("format"), num_images=int((version.stats or {}).get("num_images", 0)),
                        tags=[row.version_tag for row in snapshots if row.content_hash == version.content_hash],
                        pinned_by_jobs=int(pins.get(version.content_hash, 0)),
                        current=version.content_hash == dataset.content_hash,
                    )
                    for version in versions
                ],
            )

    # -- images -----------------------------------------------------------------------------------

    async def list_images(
        self, dataset_id: str, *, limit: int, offset: int, version: str | None, base_url: str
    ) -> schemas.ImageListResponse:
        """A page of a version's images with URLs a browser can fetch (none yet while the first upload is checked)."""
        if version is None and await asyncio.to_thread(self._awaiting_first_version, dataset_id):
            # The original dataset page opens its gallery right after an upload: an empty page, not an error.
            return schemas.ImageListResponse(dataset_id=dataset_id, content_hash=None, total_images=0, limit=limit,
                                             offset=offset, images=[])
        _, content_hash = await asyncio.to_thread(self._ready_version, dataset_id, version)
        reply = await self._storage.list_images(
            ListImagesRequest(dataset_id=dataset_id, content_hash=content_hash, offset=offset, limit=limit)
        )
        if not reply.ok:
            raise Unavailable(f"storage could not list dataset {dataset_id} version {content_hash}: {reply.error}")
        return schemas.ImageListResponse(
            dataset_id=dataset_id, content_hash=content_hash, total_images=reply.total_images, limit=limit,
            offset=offset,
            images=[
                schemas.ImageResponse(
                    filename=image.filename, size=image.size,
                    presigned_url=image.url or _served_url(base_url, dataset_id, image.filename, content_hash),
                )
                for image in reply.images
            ],
        )

    async def image_url(self, dataset_id: str, filename: str, *, version: str | None, base_url: str) -> schemas.ImageResponse:
        """Where one image can be fetched; 404 when the version has no such image."""
        _, content_hash = await asyncio.to_thread(self._ready_version, dataset_id, version)
        reply = await self._storage.list_images(
            ListImagesRequest(dataset_id=dataset_id, content_hash=content_hash, filename=filename)
        )
        if reply.not_found or (reply.ok and not reply.images):
            raise NotFound(f"filename: dataset {dataset_id} version {content_hash} has no image {filename!r}")
        if not reply.ok:
            raise Unavailable(f"storage could not find {filename!r}: {reply.error}")
        image = reply.images[0]
        return schemas.ImageResponse(
            filename=image.filename, size=image.size,
            presigned_url=image.url or _served_url(base_url, dataset_id, image.filename, content_hash),
        )

    async def image_content(self, dataset_id: str, filename: str, *, version: str | None) -> ServedImage:
        """One image, asked of storage (the API never reads its directory): inline, or spooled to a file."""
        _, content_hash = await asyncio.to_thread(self._ready_version, dataset_id, version)
        reply = await self._storage.read_image(
            ReadImageRequest(
                dataset_id=dataset_id, content_hash=content_hash, filename=filename,
                max_bytes=self._inline_bytes, stage_larger=True,
            )
        )
        if reply.not_found:
            raise NotFound(f"filename: dataset {dataset_id} version {content_hash} has no image {filename!r}")
        if not reply.ok:
            if reply.error and "limited to" in reply.error:  # a storage release that cannot stage images
                raise TooLarge(f"filename: {reply.error}")
            raise Unavailable(f"storage could not read {filename!r}: {reply.error}")
        content_type = reply.content_type or "application/octet-stream"
        if reply.object_name is None:
            return ServedImage(content_type=content_type, data=base64.b64decode(reply.content_b64 or ""))
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        destination = self._spool_dir / f"{uuid.uuid4().hex}.img"
        try:
            await self._storage.fetch_staged(reply.object_name, destination, sha256=reply.sha256)
        except BaseException:
            destination.unlink(missing_ok=True)
            raise
        return ServedImage(content_type=content_type, path=destination)

    # -- deletion ---------------------------------------------------------------------------------

    def delete_dataset(self, dataset_id: str) -> schemas.DeleteResponse:
        """Delete unless an active job pins any version; report which versions stay stored and why."""
        with self._uow.transaction() as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise NotFound(f"dataset_id: dataset {dataset_id} not found")
            active = session.execute(
                select(TrainingJob.id, TrainingJob.status, TrainingJob.dataset_snapshot_id)
                .where(TrainingJob.dataset_id == dataset_id, TrainingJob.status.in_(ACTIVE_STATUSES))
            ).all()
            if active:
                listed = ", ".join(f"{job_id} ({status})" for job_id, status, _ in active[:5])
                raise Conflict(
                    f"cannot delete dataset {dataset_id}: {len(active)} queued or running job(s) use it: {listed}"
                )
            kept = sorted({pin for pin in session.scalars(
                select(TrainingJob.dataset_snapshot_id).where(TrainingJob.dataset_id == dataset_id)
            ).all() if pin})
            known = set(session.scalars(select(DatasetVersion.content_hash).where(DatasetVersion.dataset_id == dataset_id)).all())
            # Same transaction as the delete (outbox): storage removes the files iff the rows are gone.
            OutboxRepository(session).add(DeleteDataset(dataset_id=dataset_id, keep_hashes=kept))
            session.execute(delete(DatasetSplit).where(DatasetSplit.dataset_id == dataset_id))
            session.execute(delete(DatasetSnapshot).where(DatasetSnapshot.dataset_id == dataset_id))
            session.execute(delete(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id))
            session.delete(dataset)
        removed = sorted(known - set(kept))
        message = (
            f"dataset deleted; {len(kept)} version(s) stay in storage because finished jobs trained on them "
            "(so those jobs stay reproducible)" if kept else "dataset deleted; no job trained on it"
        ) + f"; storage is removing the files of {len(removed)} other version(s)"
        return schemas.DeleteResponse(
            status="success", dataset_id=dataset_id, kept_versions=kept, deleted_versions=removed, message=message
        )


def _served_url(base_url: str, dataset_id: str, filename: str, content_hash: str) -> str:
    return (
        f"{base_url.rstrip('/')}/api/v1/datasets/{dataset_id}/images/{quote(filename)}/content?version={content_hash}"
    )


def _split_response(row: DatasetSplit) -> schemas.SplitResponse:
    return schemas.SplitResponse(
        dataset_id=row.dataset_id, content_hash=row.content_hash, method=row.method,
        default_ratio=list(row.default_ratio), seed=row.seed,
        counts={key: len(value) for key, value in row.assignment.items()},
        splits={key: list(value) for key, value in row.assignment.items()}, updated_at=row.updated_at,
    )


def _snapshot_response(row: DatasetSnapshot) -> schemas.SnapshotResponse:
    return schemas.SnapshotResponse(
        id=row.id, dataset_id=row.dataset_id, version_tag=row.version_tag, description=row.description,
        content_hash=row.content_hash, created_at=row.created_at,
    )
