"""HTTP adapter of the export use cases (`/api/v1/export`, API.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.auth.objects import require_object
from visionyard.api.exports import schemas
from visionyard.api.exports.service import ExportService

router = APIRouter(prefix="/api/v1/export", tags=["export"])


def export_service(request: Request) -> ExportService:
    """The app's export use cases."""
    service: ExportService = request.app.state.exports
    return service


Service = Annotated[ExportService, Depends(export_service)]



@router.get("/capabilities", response_model=schemas.CapabilitiesResponse)
async def capabilities(
    request: Request,
    service: Service,
    principal: CurrentPrincipal,
    training_job_id: int | None = None,
    framework: str | None = None,
    task_type: str | None = None,
) -> Any:
    """Export formats for a training job, or for a framework and task type."""
    if training_job_id is not None:
        await require_object(request, principal, "training", training_job_id, Role.VIEWER, field="training_job_id")
    return await service.capabilities(
        training_job_id=None if training_job_id is None else str(training_job_id), framework=framework,
        task_type=task_type,
    )


@router.post("/jobs", response_model=schemas.ExportJobResponse, status_code=201)
async def create_export(
    body: schemas.CreateExportRequest, request: Request, service: Service, principal: CurrentPrincipal
) -> Any:
    """Export a completed training job's stored checkpoint (best by default)."""
    await require_object(request, principal, "training", body.training_job_id, Role.MEMBER, field="training_job_id")
    return await service.create(body)


@router.get("/training/{training_job_id}/exports", response_model=schemas.ExportListResponse)
async def list_exports(training_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Every export (version) of a training job, as `export_jobs` (and `exports`)."""
    await require_object(request, principal, "training", training_job_id, Role.VIEWER, field="training_job_id")
    return await run_in_threadpool(service.list_for_training_job, str(training_job_id))


@router.get("/jobs/{export_job_id}", response_model=schemas.ExportJobResponse)
async def get_export(export_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """One export job."""
    await require_object(request, principal, "export", export_job_id, Role.VIEWER, field="export_job_id")
    return await run_in_threadpool(service.get, str(export_job_id))


@router.post("/jobs/{export_job_id}/cancel", response_model=schemas.ExportJobResponse)
async def cancel_export(export_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Stop an export: pending → cancelled, running → cancelling until the runner confirms."""
    await require_object(request, principal, "export", export_job_id, Role.MEMBER, field="export_job_id")
    return await run_in_threadpool(service.cancel, str(export_job_id))


@router.delete("/jobs/{export_job_id}", response_model=schemas.DeletedExportResponse)
async def delete_export(export_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Delete a finished export from the list (a running one is cancelled first: 409 until it stops)."""
    await require_object(request, principal, "export", export_job_id, Role.MEMBER, field="export_job_id")
    return await run_in_threadpool(service.delete, str(export_job_id))


@router.get("/{export_job_id}/download", response_model=schemas.DownloadResponse)
async def download(export_job_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Where to download a completed export's package (a link the browser can open without headers)."""
    await require_object(request, principal, "export", export_job_id, Role.VIEWER, field="export_job_id")
    ticket = request.app.state.auth.download_ticket(str(export_job_id))
    route = f"{request.url_for('download_package', export_job_id=export_job_id)}?ticket={ticket}"
    return await service.download(str(export_job_id), package_route=route)


@router.get("/{export_job_id}/package", name="download_package")
async def download_package(export_job_id: int, request: Request, service: Service, ticket: str | None = None) -> FileResponse:
    """The package zip itself, fetched from storage, for the holder of a download ticket or a credential."""
    if not (ticket and request.app.state.auth.check_download_ticket(ticket, str(export_job_id))):
        from visionyard.api.auth.dependencies import require_principal

        principal = await require_principal(request, request.headers.get("authorization"),
                                            request.headers.get("x-api-key"))
        await require_object(request, principal, "export", export_job_id, Role.VIEWER, field="export_job_id")
    scratch = Path(tempfile.mkdtemp(prefix="vy-package-"))
    try:
        path, filename = await service.package(str(export_job_id), scratch / "package.zip")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return FileResponse(path, media_type="application/zip", filename=filename,
                        background=BackgroundTask(shutil.rmtree, scratch, True))
