"""HTTP adapter of the inference use cases (`/api/v1/test_inference`, API.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import starlette.datastructures
from fastapi import APIRouter, Depends, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.auth.objects import require_object
from visionyard.api.errors import InvalidInput, TooLarge
from visionyard.api.inference import schemas
from visionyard.api.inference.service import InferenceService, ReceivedFile

router = APIRouter(prefix="/api/v1/test_inference", tags=["inference"])

MAX_FILES = 1000
MAX_FILE_BYTES = 50 * 1024 * 1024


def inference_service(request: Request) -> InferenceService:
    """The app's inference use cases."""
    service: InferenceService = request.app.state.inference
    return service


Service = Annotated[InferenceService, Depends(inference_service)]


async def spool_upload(upload: starlette.datastructures.UploadFile, path: Path, *, field: str, index: int = 0) -> ReceivedFile:
    """Write an uploaded file to `path` in chunks, refusing one over the size limit (413 naming `field`).

    Starlette's upload class, not FastAPI's subclass: a form read by hand (deployments) yields the former.
    """
    name = Path(upload.filename or f"image-{index}").name
    size = 0
    with path.open("wb") as sink:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise TooLarge(f"{field}: {name} is larger than {MAX_FILE_BYTES} bytes")
            sink.write(chunk)
    return ReceivedFile(filename=name, path=path)


@router.post("/inference/upload-images", response_model=schemas.UploadResponse)
async def upload_images(
    request: Request, service: Service, principal: CurrentPrincipal, files: list[UploadFile],
    training_job_id: int | None = None,
) -> Any:
    """Upload images (multipart `files`) for inference; anything that is not an image is refused."""
    if training_job_id is not None:
        await require_object(request, principal, "training", training_job_id, Role.MEMBER, field="training_job_id")
    if len(files) > MAX_FILES:
        raise InvalidInput("files", f"at most {MAX_FILES} files per upload")
    scratch = Path(tempfile.mkdtemp(prefix="vy-infer-upload-"))
    try:
        received = [await spool_upload(upload, scratch / f"{index:05d}", field="files", index=index)
                    for index, upload in enumerate(files)]
        return await service.upload_images(
            received, training_job_id=None if training_job_id is None else str(training_job_id),
            uploaded_by=principal.user_id,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@router.post("/inference/upload-image", response_model=schemas.SingleUploadResponse)
async def upload_image(
    service: Service, principal: CurrentPrincipal, file: UploadFile, session_id: Annotated[str, Query()],
) -> Any:
    """Upload one image (multipart `file`) into the caller's test session; `server_path` names it to `quick`."""
    scratch = Path(tempfile.mkdtemp(prefix="vy-infer-upload-"))
    try:
        received = await spool_upload(file, scratch / "image", field="file")
        return await service.upload_image(received, session_id=session_id, uploaded_by=principal.user_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@router.post("/inference/quick", response_model=schemas.QuickInferenceResponse)
async def quick_inference(
    request: Request, service: Service, principal: CurrentPrincipal,
    query: Annotated[schemas.QuickInferenceRequest, Query()],
) -> Any:
    """Classify one uploaded image with a stored checkpoint and answer when the runner is done (504 past the wait)."""
    await require_object(request, principal, "training", query.training_job_id, Role.MEMBER, field="training_job_id")
    return await service.quick(query, uploaded_by=principal.user_id, any_uploader=principal.is_admin,
                               timeout=request.app.state.settings.inference_wait_seconds)


@router.delete("/inference/session/{session_id}", response_model=schemas.SessionDeleted)
async def delete_session(session_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """Release the caller's images of a test session (storage deletes them); an unknown session releases none."""
    return await run_in_threadpool(service.release_session, session_id, uploaded_by=principal.user_id,
                                   any_uploader=principal.is_admin)


@router.post("/inference/jobs", response_model=schemas.InferenceJobResponse, status_code=201)
async def create_inference(
    body: schemas.CreateInferenceRequest, request: Request, service: Service, principal: CurrentPrincipal
) -> Any:
    """Run a stored checkpoint on uploaded images (single, batch) or on a dataset split."""
    await require_object(request, principal, "training", body.training_job_id, Role.MEMBER, field="training_job_id")
    return await run_in_threadpool(service.create, body)


@router.post("/inference/jobs/{inference_job_id}/cancel", response_model=schemas.InferenceJobResponse)
async def cancel_inference(inference_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Stop an inference job: pending → cancelled, running → cancelling until the runner confirms."""
    await require_object(request, principal, "inference", inference_job_id, Role.MEMBER, field="inference_job_id")
    return await run_in_threadpool(service.cancel, str(inference_job_id))


@router.get("/inference/jobs/detail/{inference_job_id}", response_model=schemas.InferenceJobResponse)
async def get_inference(inference_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """One inference job."""
    await require_object(request, principal, "inference", inference_job_id, Role.VIEWER, field="inference_job_id")
    return await run_in_threadpool(service.get, str(inference_job_id))


@router.get("/inference/jobs/{inference_job_id}/results", response_model=schemas.ResultsResponse)
async def results(
    inference_job_id: int, request: Request, service: Service, principal: CurrentPrincipal,
    skip: int = Query(default=0, ge=0), limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """A page of per-image results."""
    await require_object(request, principal, "inference", inference_job_id, Role.VIEWER, field="inference_job_id")
    return await run_in_threadpool(service.results, str(inference_job_id), skip=skip, limit=limit)


@router.get("/inference/jobs/{training_job_id}", response_model=schemas.InferenceListResponse)
async def list_inference(training_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Every inference job of a training job, with a summary."""
    await require_object(request, principal, "training", training_job_id, Role.VIEWER, field="training_job_id")
    return await run_in_threadpool(service.list_for_training_job, str(training_job_id))
