"""HTTP adapter of the validation views (`/api/v1/validation`, read by the original frontend's tabs)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.auth.objects import require_object
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
