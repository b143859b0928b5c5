"""HTTP adapter of the validation views (`/api/v1/validation`, read by the original frontend's tabs)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.auth.objects import require_object
from visionyard.api.datasets.versions import DatasetVersionService
from visionyard.api.validation.service import ValidationService

router = APIRouter(prefix="/api/v1/validation", tags=["validation"])


def validation_service(request: Request) -> ValidationService:
    """The app's validation views."""
    service: ValidationService = request.app.state.validation
    return service


Service = Annotated[ValidationService, Depends(validation_service)]


async def _readable(request: Request, principal: CurrentPrincipal, job_id: int) -> None:
    await require_object(request, principal, "training", job_id, Role.VIEWER, field="job_id")


@router.get("/jobs/{job_id}/summary")
async def summary(job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> dict[str, Any]:
    """Per-epoch metrics with each epoch's kept checkpoint, and the best epoch by the job's primary metric."""
    await _readable(request, principal, job_id)
    return await run_in_threadpool(service.summary, str(job_id))


@router.get("/jobs/{job_id}/results/{epoch}")
async def results(
    job_id: int, epoch: Annotated[int, Path(ge=0)], request: Request, service: Service, principal: CurrentPrincipal
) -> dict[str, Any]:
    """One epoch's per-class metrics and confusion matrix."""
    await _readable(request, principal, job_id)
    return await run_in_threadpool(service.results, str(job_id), epoch)


@router.get("/jobs/{job_id}/results/{epoch}/images")
async def images(
    job_id: int, epoch: Annotated[int, Path(ge=0)], request: Request, service: Service, principal: CurrentPrincipal,
    true_label_id: Annotated[int | None, Query(ge=0)] = None,
    predicted_label_id: Annotated[int | None, Query(ge=0)] = None,
    correct: bool | None = None,
    skip: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """One epoch's per-image results (true and predicted label, confidence, correct), by confusion-matrix cell."""
    await _readable(request, principal, job_id)
    return await run_in_threadpool(
        service.images, str(job_id), epoch, true_label_id=true_label_id, predicted_label_id=predicted_label_id,
        correct=correct, skip=skip, limit=limit, base_url=str(request.base_url),
    )


@router.get("/images/{image_id}")
async def image(image_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Response:
    """A validation image itself (from the job's pinned dataset version): the bytes, or a redirect on S3."""
    await require_object(request, principal, "validation_image", image_id, Role.VIEWER, field="image_id")
    source = await run_in_threadpool(service.image_source, image_id)
    versions: DatasetVersionService = request.app.state.dataset_versions
    located = await versions.image_url(source.dataset_id, source.filename, version=source.content_hash,
                                       base_url=str(request.base_url))
    if "/content?" not in located.presigned_url:
        return RedirectResponse(located.presigned_url, status_code=307)
    served = await versions.image_content(source.dataset_id, source.filename, version=source.content_hash)
    headers = {"Cache-Control": "private, max-age=3600"}
    if served.path is not None:
        return FileResponse(served.path, media_type=served.content_type, headers=headers,
                            background=BackgroundTask(served.path.unlink, missing_ok=True))
    return Response(content=served.data or b"", media_type=served.content_type, headers=headers)
