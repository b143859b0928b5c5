"""HTTP adapter of the inference use cases (`/api/v1/test_inference`, API.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, UploadFile

from visionyard.api.auth import require_principal
from visionyard.api.errors import InvalidInput, TooLarge
from visionyard.api.inference import schemas
from visionyard.api.inference.service import InferenceService, ReceivedFile

router = APIRouter(prefix="/api/v1/test_inference", tags=["inference"], dependencies=[Depends(require_principal)])

MAX_FILES = 1000
MAX_FILE_BYTES = 50 * 1024 * 1024


def inference_service(request: Request) -> InferenceService:
    """The app's inference use cases."""
    service: InferenceService = request.app.state.inference
    return service


Service = Annotated[InferenceService, Depends(inference_service)]


@router.post("/inference/upload-images", response_model=schemas.UploadResponse)
async def upload_images(service: Service, files: list[UploadFile], training_job_id: str | None = None) -> Any:
    """Upload images (multipart `files`) for inference; anything that is not an image is refused."""
    if len(files) > MAX_FILES:
        raise InvalidInput("files", f"at most {MAX_FILES} files per upload")
    scratch = Path(tempfile.mkdtemp(prefix="vy-infer-upload-"))
    try:
        received: list[ReceivedFile] = []
        for index, upload in enumerate(files):
            name = Path(upload.filename or f"image-{index}").name
            path = scratch / f"{index:05d}"
            size = 0
            with path.open("wb") as sink:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > MAX_FILE_BYTES:
                        raise TooLarge(f"files: {name} is larger than {MAX_FILE_BYTES} bytes")
                    sink.write(chunk)
            received.append(ReceivedFile(filename=name, path=path))
        return await service.upload_images(received, training_job_id=training_job_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@router.post("/inference/jobs", response_model=schemas.InferenceJobResponse, status_code=201)
def create_inference(body: schemas.CreateInferenceRequest, service: Service) -> Any:
    """Classify uploaded images (single, batch) or a dataset split with a stored checkpoint."""
    return service.create(body)


@router.post("/inference/jobs/{inference_job_id}/cancel", response_model=schemas.InferenceJobResponse)
def cancel_inference(inference_job_id: str, service: Service) -> Any:
    """Stop an inference job: pending → cancelled, running → cancelling until the runner confirms."""
    return service.cancel(inference_job_id)


@router.get("/inference/jobs/detail/{inference_job_id}", response_model=schemas.InferenceJobResponse)
def get_inference(inference_job_id: str, service: Service) -> Any:
    """One inference job."""
    return service.get(inference_job_id)


@router.get("/inference/jobs/{inference_job_id}/results", response_model=schemas.ResultsResponse)
def results(
    inference_job_id: str, service: Service, skip: int = Query(default=0, ge=0),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """A page of per-image results."""
    return service.results(inference_job_id, skip=skip, limit=limit)


@router.get("/inference/jobs/{training_job_id}", response_model=schemas.InferenceListResponse)
def list_inference(training_job_id: str, service: Service) -> Any:
    """Every inference job of a training job, with a summary."""
    return service.list_for_training_job(training_job_id)
