"""HTTP adapter of the dataset use cases (`/api/v1/datasets`, API.md), including streamed uploads."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.config import ApiSettings
from visionyard.api.datasets import schemas
from visionyard.api.datasets.service import DatasetService
from visionyard.api.datasets.versions import DatasetVersionService
from visionyard.api.errors import Conflict, InvalidInput, NotFound, TooLarge

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

CHUNK = 1 << 20
# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_SLACK = 64 * 1024
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def dataset_service(request: Request) -> DatasetService:
    """The app's dataset use cases."""
    service: DatasetService = request.app.state.datasets
    return service


Service = Annotated[DatasetService, Depends(dataset_service)]


def version_service(request: Request) -> DatasetVersionService:
    """The app's dataset version use cases."""
    service: DatasetVersionService = request.app.state.dataset_versions
    return service


Versions = Annotated[DatasetVersionService, Depends(version_service)]
# A folder upload may name this many files (the storage limit on archive entries still applies).
MAX_FOLDER_FILES = 50_000
ANNOTATION_FIELDS = ("annotations", "annotations.json")


@router.post("/analyze", response_model=schemas.AnalyzeResponse)
async def analyze(body: schemas.AnalyzeRequest, service: Service, principal: CurrentPrincipal) -> Any:
    """Describe a dataset of the caller's projects named by `path` (its id, name or stored URI, never a host path).

    Errors carry `message` beside `detail`: the wizard shows `message`.
    """
    try:
        return await run_in_threadpool(service.analyze, principal, body)
    except (InvalidInput, NotFound, Conflict) as error:
        status = 422 if isinstance(error, InvalidInput) else 404 if isinstance(error, NotFound) else 409
        return JSONResponse(status_code=status, content={"status": "error", "detail": str(error), "message": str(error)})


@router.post("", response_model=schemas.CreateDatasetResponse, status_code=201)
def create_dataset(body: schemas.CreateDatasetRequest, service: Service, principal: CurrentPrincipal) -> Any:
    """Register a dataset (empty until an upload is ingested)."""
    return service.create_dataset(body, principal=principal)


@router.get("/available", response_model=list[schemas.DatasetResponse])
def available_datasets(service: Service, principal: CurrentPrincipal, labeled: bool | None = None) -> Any:
    """The datasets of the caller's projects, newest first (`labeled=true` for labeled ones only)."""
    return service.list_available(principal, labeled=labeled)


@router.get("/{dataset_id}", response_model=schemas.DatasetResponse)
def get_dataset(dataset_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """One dataset with the statistics of its current version."""
    return service.authorize(principal, dataset_id, Role.VIEWER)


@router.delete("/{dataset_id}", response_model=schemas.DeleteResponse)
def delete_dataset(dataset_id: str, service: Service, versions: Versions, principal: CurrentPrincipal) -> Any:
    """Delete a dataset (409 while a queued or running job pins any version); says what stays stored."""
    service.authorize(principal, dataset_id, Role.MEMBER)
    return versions.delete_dataset(dataset_id)


@router.post("/{dataset_id}/split", response_model=schemas.SplitResponse)
async def set_split(
    dataset_id: str, body: schemas.SplitRequest, service: Service, versions: Versions, principal: CurrentPrincipal
) -> Any:
    """Configure the current version's train/val(/test) split (auto, manual or partial)."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.MEMBER)
    return await versions.set_split(dataset_id, body)


@router.get("/{dataset_id}/split", response_model=schemas.SplitResponse)
def get_split(
    dataset_id: str, service: Service, versions: Versions, principal: CurrentPrincipal, version: str | None = None
) -> Any:
    """The split of the current version (or `?version=<content_hash>`)."""
    service.authorize(principal, dataset_id, Role.VIEWER)
    return versions.get_split(dataset_id, version)


@router.post("/{dataset_id}/snapshot", response_model=schemas.SnapshotResponse, status_code=201)
def create_snapshot(
    dataset_id: str, body: schemas.SnapshotRequest, service: Service, versions: Versions, principal: CurrentPrincipal
) -> Any:
    """Name the current version (409 when the tag exists)."""
    service.authorize(principal, dataset_id, Role.MEMBER)
    return versions.create_snapshot(dataset_id, body)


@router.get("/{dataset_id}/snapshots", response_model=schemas.SnapshotListResponse)
def list_snapshots(dataset_id: str, service: Service, versions: Versions, principal: CurrentPrincipal) -> Any:
    """Named snapshots and every stored version."""
    service.authorize(principal, dataset_id, Role.VIEWER)
    return versions.list_snapshots(dataset_id)


@router.get("/{dataset_id}/images", response_model=schemas.ImageListResponse)
async def list_images(
    dataset_id: str,
    request: Request,
    service: Service,
    versions: Versions,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    version: str | None = None,
) -> Any:
    """A page of the current (or a named) version's images with URLs a browser can fetch."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.VIEWER)
    return await versions.list_images(
        dataset_id, limit=limit, offset=offset, version=version, base_url=str(request.base_url)
    )


@router.get("/{dataset_id}/images/{filename:path}/url", response_model=schemas.ImageResponse)
async def image_url(
    dataset_id: str, filename: str, request: Request, service: Service, versions: Versions,
    principal: CurrentPrincipal, version: str | None = None,
) -> Any:
    """Where one image can be fetched."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.VIEWER)
    return await versions.image_url(dataset_id, filename, version=version, base_url=str(request.base_url))


@router.get("/{dataset_id}/images/{filename:path}/content")
async def image_content(
    dataset_id: str, filename: str, request: Request, service: Service, versions: Versions,
    principal: CurrentPrincipal, version: str | None = None,
) -> Response:
    """The image itself: served from storage's reply on the local backend, a redirect on S3."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.VIEWER)
    located = await versions.image_url(dataset_id, filename, version=version, base_url=str(request.base_url))
    if "/content?" not in located.presigned_url:
        return RedirectResponse(located.presigned_url, status_code=307)
    image = await versions.image_content(dataset_id, filename, version=version)
    headers = {"Cache-Control": "private, max-age=3600"}
    if image.path is not None:
        # Streamed from the spooled copy in chunks, then deleted once sent (or the client went away).
        return FileResponse(
            image.path, media_type=image.content_type, headers=headers,
            background=BackgroundTask(image.path.unlink, missing_ok=True),
        )
    return Response(content=image.data or b"", media_type=image.content_type, headers=headers)


@router.post(
    "/upload",
    status_code=202,
    response_model=schemas.UploadAccepted,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {
                        "file": {"type": "string", "format": "binary"}, "name": {"type": "string"},
                        "description": {"type": "string"}, "visibility": {"type": "string"},
                        "project_id": {"type": "integer"},
                    }}
                }
            }
        }
    },
)
async def upload_new_dataset(request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Create a dataset from one zip (multipart `file`; optional `name`, `description`, `visibility`, `project_id`)."""
    settings: ApiSettings = request.app.state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise InvalidInput("file", "send multipart/form-data with the zip in field 'file'")
    spool_dir = settings.data_dir / "uploads"
    spool_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=spool_dir)
    os.close(handle)
    target = Path(name)
    try:
        fields: dict[str, str] = {}
        filename = await _receive_multipart(request, target, limit=settings.upload_max_bytes, fields=fields)
        project = fields.get("project_id") or None
        try:
            # Validated, not constructed: the form's strings are untrusted (visibility must be a known one).
            body = schemas.CreateDatasetRequest.model_validate({
                "name": (fields.get("name") or fields.get("dataset_name") or PurePosixPath(filename).stem or "dataset")[:256],
                "description": fields.get("description") or None, "visibility": fields.get("visibility") or "private",
                "project_id": int(project) if project and project.isdigit() else None,
            })
        except ValidationError as error:
            problem = error.errors()[0]
            raise InvalidInput(".".join(str(part) for part in problem["loc"]) or "body", problem["msg"]) from None
        if project and not project.isdigit():
            raise InvalidInput("project_id", "must be a project's integer id")
        created = await run_in_threadpool(service.create_dataset, body, principal=principal)
        return await service.ingest_upload(created.dataset_id, path=target, filename=filename)
    finally:
        target.unlink(missing_ok=True)


@router.post(
    "/{dataset_id}/upload",
    status_code=202,
    response_model=schemas.UploadAccepted,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                               "required": ["file"]}
                },
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    },
)
async def upload_dataset(dataset_id: str, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Upload a zip (multipart field `file`, or a raw `application/zip` body), streamed to disk."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.MEMBER)
    settings: ApiSettings = request.app.state.settings
    limit = settings.upload_max_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise TooLarge(f"file: the upload is {declared} bytes; the limit is {limit} bytes")
    spool_dir = settings.data_dir / "uploads"
    spool_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=spool_dir)
    os.close(handle)
    target = Path(name)
    try:
        if content_type == "multipart/form-data":
            filename = await _receive_multipart(request, target, limit=limit)
        elif content_type in ZIP_TYPES:
            await _receive_raw(request, target, limit=limit)
            filename = request.headers.get("x-filename") or f"{dataset_id}.zip"
        else:
            raise InvalidInput(
                "file", f"unsupported content type {content_type or '(none)'!r}; send multipart field 'file' or application/zip"
            )
        return await service.ingest_upload(dataset_id, path=target, filename=filename)
    finally:
        target.unlink(missing_ok=True)


@router.post(
    "/{dataset_id}/upload-images",
    status_code=202,
    response_model=schemas.UploadAccepted,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "annotations": {"type": "string", "format": "binary"},
                        },
                        "required": ["files"],
                    }
                }
            }
        }
    },
)
async def upload_images(dataset_id: str, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Upload a folder: many `files` named by relative path (+ optional `annotations.json`), zipped server-side."""
    await run_in_threadpool(service.authorize, principal, dataset_id, Role.MEMBER)
    settings: ApiSettings = request.app.state.settings
    limit = settings.upload_max_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise InvalidInput("files", "send multipart/form-data with one 'files' part per image, named by relative path")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise TooLarge(f"files: the upload is {declared} bytes; the limit is {limit} bytes")
    spool_dir = settings.data_dir / "uploads"
    spool_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="folder-", suffix=".zip", dir=spool_dir)
    os.close(handle)
    target = Path(name)
    try:
        count = await _receive_folder(request, target, limit=limit)
        return await service.ingest_upload(dataset_id, path=target, filename=f"folder upload ({count} files)")
    finally:
        target.unlink(missing_ok=True)


def _folder_member_name(raw: str | None, index: int) -> str:
    """A part's relative path, refused (naming the part) when it could not be a dataset file."""
    name = (raw or "").replace("\\", "/")
    where = f"files[{index}]"
    if not name.strip():
        raise InvalidInput(where, "a file part has no filename (use the file's path relative to the folder)")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidInput(where, f"{name!r} is an absolute path; use the path relative to the folder")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise InvalidInput(where, f"{name!r} leaves the folder ('..'); use the path relative to the folder")
    return "/".join(part for part in parts if part not in ("", "."))


async def _receive_folder(request: Request, target: Path, *, limit: int) -> int:
    """Write every uploaded part into a stored zip on disk, chunk by chunk; the number of files."""
    counted = _size_limited(request, limit=limit, field="files")
    seen: dict[str, int] = {}
    async with counted.form(max_files=MAX_FOLDER_FILES + 1, max_fields=20) as form:
        parts: list[tuple[str, UploadFile]] = []
        for index, upload in enumerate(form.getlist("files")):
            if not isinstance(upload, UploadFile):
                raise InvalidInput(f"files[{index}]", "must be a file part with a filename (its path relative to the folder)")
            parts.append((_folder_member_name(upload.filename, index), upload))
        for field_name in ANNOTATION_FIELDS:
            annotation = form.get(field_name)
            if isinstance(annotation, UploadFile):
                parts.append(("annotations.json", annotation))
        if not parts:
            raise InvalidInput("files", "no files: send one multipart part named 'files' per image")
        size = 0
        # Stored, not deflated: images are compressed already, and storage re-checks everything.
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for index, (member, upload) in enumerate(parts):
                folded = member.casefold()
                if folded in seen:
                    raise InvalidInput(f"files[{index}]", f"{member!r} is uploaded twice (also files[{seen[folded]}])")
                seen[folded] = index
                with archive.open(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as sink:
                    while chunk := await upload.read(CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise TooLarge(f"files: the upload exceeds the limit of {limit} bytes")
                        sink.write(chunk)
        return len(parts)


async def _receive_raw(request: Request, target: Path, *, limit: int) -> None:
    size = 0
    with target.open("wb") as sink:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"file: the upload exceeds the limit of {limit} bytes")
            sink.write(chunk)
    if size == 0:
        raise InvalidInput("file", "the request body is empty")


def _size_limited(request: Request, *, limit: int, field: str) -> Request:
    """The request, refusing (413 naming `field`) once its body passes `limit` plus multipart framing.

    The refusal comes while the body streams in, before the form parser spools an oversized file to disk.
    """
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_SLACK:
                raise TooLarge(f"{field}: the upload exceeds the limit of {limit} bytes")
        return message

    return Request(request.scope, counting_receive)


async def _receive_multipart(request: Request, target: Path, *, limit: int, fields: dict[str, str] | None = None) -> str:
    counted = _size_limited(request, limit=limit, field="file")
    async with counted.form(max_files=1, max_fields=20) as form:
        if fields is not None:
            fields.update({key: value for key, value in form.items() if isinstance(value, str)})
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("file", "missing multipart file field 'file'")
        size = 0
        with target.open("wb") as sink:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"file: the upload exceeds the limit of {limit} bytes")
                sink.write(chunk)
        if size == 0:
            raise InvalidInput("file", "the uploaded file is empty")
        return upload.filename or "upload.zip"
