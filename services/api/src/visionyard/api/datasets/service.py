"""Dataset use cases: create, read, delete, and hand uploads to storage for ingestion."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Protocol

from visionyard.api.auth.access import Role, project_filter, project_for_new_object, require_project_role
from visionyard.api.auth.principal import Principal
from visionyard.api.datasets import schemas
from visionyard.api.datasets.repository import DatasetRepository
from visionyard.api.db.models import Dataset, utcnow
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, InvalidInput, NotFound
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.shared.commands import IngestDataset

# Where a dataset's files came from, in the original platform's terms: every Visionyard dataset is uploaded.
DATASET_SOURCE = "upload"

# A zip archive starts with a local file header, or (when empty) with the end-of-directory record.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class ObjectStaging(Protocol):
    """The staging object store files cross service boundaries through."""

    async def put_file(self, name: str, path: Path) -> tuple[str, int]:
        """Put a file; its sha256 and size."""
        ...


def to_response(dataset: Dataset) -> schemas.DatasetResponse:
    """The wire form of a dataset."""
    return schemas.DatasetResponse(
        id=dataset.id, project_id=int(dataset.project_id), name=dataset.name,
        # Never null, and `source` always there: the original frontend's dataset search lower-cases
        # description, format and source unguarded (DatasetPanel.tsx:118-123), and its table upper-cases
        # format. Format is "unknown" until an upload is ingested.
        description=dataset.description or "", source=DATASET_SOURCE,
        format=dataset.format or "unknown", labeled=dataset.labeled, num_items=dataset.num_images, num_images=dataset.num_images,
        num_classes=dataset.num_classes, class_names=list(dataset.class_names or []),
        class_counts=dict(dataset.class_counts or {}), splits=dict(dataset.splits or {}),
        task_types=list(dataset.task_types or []), size_mb=round((dataset.size_bytes or 0) / 1024**2, 3),
        visibility=dataset.visibility, status=dataset.status, content_hash=dataset.content_hash,
        rejection_reason=dataset.rejection_reason, created_at=dataset.created_at,
    )


# What `POST /datasets/analyze` refuses to read as a dataset reference: anything that names a file of a host.
_HOST_PATH = re.compile(r"^(/|~|\\|\.{1,2}[/\\]|[A-Za-z]:[/\\]|file:)|\\|(^|/)\.\.(/|$)")
_URI = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)
_STORED = re.compile(r"(^|/)datasets/([A-Za-z0-9][A-Za-z0-9_-]{0,63})(/|$)")
FORMAT_ALIASES = {"image_folder": "imagefolder", "imagenet": "imagefolder", "ultralytics": "yolo"}


def check_zip_magic(path: Path) -> None:
    """InvalidInput unless the file starts like a zip archive."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head not in ZIP_MAGIC:
        raise InvalidInput("file", "not a zip archive (its first bytes are not a zip signature)")


class DatasetService:
    """The dataset use cases."""

    def __init__(self, *, uow: UnitOfWork, staging: ObjectStaging) -> None:
        self._uow = uow
        self._staging = staging

    def create_dataset(
        self, request: schemas.CreateDatasetRequest, *, principal: Principal
    ) -> schemas.CreateDatasetResponse:
        """Register an empty dataset in a project the caller works in; data arrives with an upload."""
        with self._uow.transaction() as session:
            project_id = project_for_new_object(session, principal, request.project_id)
            dataset = Dataset(
                id=uuid.uuid4().hex, project_id=project_id, name=request.name,
                description=request.description, visibility=request.visibility, status="empty",
                class_names=[], class_counts={}, splits={}, task_types=[], created_at=utcnow(),
            )
            DatasetRepository(session).add(dataset)
            session.flush()
            view = to_response(dataset)
        # "success": the original frontend treats anything else as a failure.
        return schemas.CreateDatasetResponse(status="success", dataset_id=view.id, dataset=view,
                                             message=f"dataset {view.name!r} created")

    def list_available(self, principal: Principal, *, labeled: bool | None = None) -> list[schemas.DatasetResponse]:
        """The datasets of the caller's projects, newest first (only labeled or unlabeled ones when asked)."""
        with self._uow.read() as session:
            visible = project_filter(session, principal)
            rows = DatasetRepository(session).list()
            return [to_response(row) for row in rows
                    if (visible is None or row.project_id in visible) and (labeled is None or row.labeled == labeled)]

    def authorize(self, principal: Principal, dataset_id: str, need: Role) -> schemas.DatasetResponse:
        """The dataset when the caller's role in its project is at least `need` (NotFound when it may not see it)."""
        missing = f"dataset_id: dataset {dataset_id} not found"
        with self._uow.read() as session:
            dataset = DatasetRepository(session).get(dataset_id)
            if dataset is None:
                raise NotFound(missing)
            require_project_role(session, principal, dataset.project_id, need, not_found=missing)
            return to_response(dataset)

    def analyze(self, principal: Principal, request: schemas.AnalyzeRequest) -> schemas.AnalyzeResponse:
        """Describe a dataset the caller may read, named by `path`: its id, its name, or its stored (S3) URI.

        `path` never names a file or folder of the API host: the API reads no filesystem on a caller's
        behalf (that would hand out the host's files), and every dataset lives in storage anyway. Such a
        path is refused with 422 naming `path` and what it may be instead.
        """
        wanted = request.path.strip()
        if not wanted or _HOST_PATH.search(wanted):
            raise InvalidInput("path", "the API does not read paths on its host; name a dataset of your projects by "
                                       "its id or name, or (on S3) by its stored s3:// URI; upload a folder or zip to make one")
        with self._uow.read() as session:
            visible = project_filter(session, principal)
            rows = [row for row in DatasetRepository(session).list() if visible is None or row.project_id in visible]
            uri = _URI.match(wanted)
            if uri:
                stored = _STORED.search(uri.group(2))
                chosen = [row for row in rows if stored and row.id == stored.group(2) and row.uri
                          and row.uri.split("://", 1)[0].lower() == uri.group(1).lower()
                          and row.uri.split("://", 1)[1].split("/", 1)[0] == uri.group(2).split("/", 1)[0]]
                if not chosen:
                    raise NotFound(f"path: {wanted} is not the stored URI of a dataset in your projects")
            else:
                chosen = [row for row in rows if row.id == wanted] or [row for row in rows if row.name == wanted]
                if not chosen:
                    raise NotFound(f"path: no dataset with the id or name {wanted!r} in your projects")
                if len(chosen) > 1:
                    ids = ", ".join(row.id for row in chosen[:5])
                    raise InvalidInput("path", f"{len(chosen)} datasets are named {wanted!r}; give the id ({ids})")
            dataset = chosen[0]
            require_project_role(session, principal, dataset.project_id, Role.VIEWER,
                                 not_found=f"path: no dataset with the id or name {wanted!r} in your projects")
            if dataset.status != "ready" or not dataset.format:
                reason = f" ({dataset.rejection_reason})" if dataset.rejection_reason else ""
                raise Conflict(f"path: dataset {dataset.id} is {dataset.status}{reason}; it can be analysed once an "
                               "upload of it is stored")
            if request.format_hint:
                hint = request.format_hint.strip().lower()
                if FORMAT_ALIASES.get(hint, hint) != dataset.format.lower():
                    raise InvalidInput("format_hint", f"dataset {dataset.id} is {dataset.format}, not {request.format_hint}")
            view = to_response(dataset)
        info = {
            "dataset_id": view.id, "path": wanted, "name": view.name, "format": view.format, "labeled": view.labeled,
            "num_images": view.num_images, "num_classes": view.num_classes, "class_names": view.class_names,
            "class_counts": view.class_counts, "splits": view.splits, "task_types": view.task_types,
            "size_mb": view.size_mb, "content_hash": view.content_hash, "uri": dataset.uri,
        }
        return schemas.AnalyzeResponse(status="success", dataset_info=info,
                                       message=f"dataset {view.name!r}: {view.format}, {view.num_images} images, "
                                               f"{view.num_classes} classes")

    def get_dataset(self, dataset_id: str) -> schemas.DatasetResponse:
        """One dataset."""
        with self._uow.read() as session:
            dataset = DatasetRepository(session).get(dataset_id)
            if dataset is None:
                raise NotFound(f"dataset_id: dataset {dataset_id} not found")
            return to_response(dataset)

    async def ingest_upload(self, dataset_id: str, *, path: Path, filename: str) -> schemas.UploadAccepted:
        """Stage an uploaded archive and ask storage to ingest it (status → processing)."""
        check_zip_magic(path)
        object_name = f"upload/{dataset_id}/{uuid.uuid4().hex}.zip"
        sha256, size = await self._staging.put_file(object_name, path)
        command = IngestDataset(
            dataset_id=dataset_id, object_name=object_name, sha256=sha256, size_bytes=size, filename=filename
        )
        await asyncio.to_thread(self._mark_processing, dataset_id, command)
        return schemas.UploadAccepted(
            status="success", dataset_id=dataset_id, message="upload accepted; storage is checking it (the dataset becomes ready or rejected)",
            object_name=object_name, sha256=sha256, size_bytes=size,
        )

    def _mark_processing(self, dataset_id: str, command: IngestDataset) -> None:
        with self._uow.transaction() as session:
            dataset = DatasetRepository(session).get(dataset_id)
            if dataset is None:
                raise NotFound(f"dataset_id: dataset {dataset_id} not found")
            dataset.status = "processing"
            dataset.rejection_reason = None
            OutboxRepository(session).add(command)
