"""HTTP adapter of the dataset use cases (`/api/v1/datasets`, API.md), including streamed uploads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from visionyard.api.auth import CurrentPrincipal, authorize_project, require_principal
from visionyard.api.config import ApiSettings
from visionyard.api.datasets import schemas
from visionyard.api.datasets.service import DatasetService
from visionyard.api.errors import InvalidInput, TooLarge

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"], dependencies=[Depends(require_principal)])

CHUNK = 1 << 20
# Multipart framing (boundaries, part headers) on top of the file itself.
MULTIPART_SLACK = 64 * 1024
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def dataset_service(request: Request) -> DatasetService:
    """The app's dataset use cases."""
    service: DatasetService = request.app.state.datasets
    return service


Service = Annotated[DatasetService, Depends(dataset_service)]


@router.post("", response_model=schemas.CreateDatasetResponse, status_code=201)
def create_dataset(body: schemas.CreateDatasetRequest, service: Service, principal: CurrentPrincipal) -> Any:
    """Register a dataset (empty until an upload is ingested)."""
    authorize_project(principal, body.project_id)
    return service.create_dataset(body)


@router.get("/available", response_model=list[schemas.DatasetResponse])
def available_datasets(service: Service) -> Any:
    """Every dataset, newest first."""
    return service.list_available()


@router.get("/{dataset_id}", response_model=schemas.DatasetResponse)
def get_dataset(dataset_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """One dataset with the statistics of its current version."""
    dataset = service.get_dataset(dataset_id)
    authorize_project(principal, dataset.project_id)
    return dataset


@router.delete("/{dataset_id}")
def delete_dataset(dataset_id: str, service: Service, principal: CurrentPrincipal) -> dict[str, str]:
    """Delete a dataset (409 while a queued or running job uses it)."""
    authorize_project(principal, service.get_dataset(dataset_id).project_id)
    service.delete_dataset(dataset_id)
    return {"status": "deleted", "dataset_id": dataset_id}


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
    dataset = await run_in_threadpool(service.get_dataset, dataset_id)
    authorize_project(principal, dataset.project_id)
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


async def _receive_multipart(request: Request, target: Path, *, limit: int) -> str:
    received = 0

    async def counting_receive() -> Message:
        # Refuse while the body streams in, before the parser spools an oversized file to disk.
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_SLACK:
                raise TooLarge(f"file: the upload exceeds the limit of {limit} bytes")
        return message

    counted = Request(request.scope, counting_receive)
    async with counted.form(max_files=1, max_fields=20) as form:
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
