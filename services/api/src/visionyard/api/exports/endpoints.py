"""HTTP adapter of the export use cases (`/api/v1/export`, API.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from visionyard.api.auth import require_principal
from visionyard.api.exports import schemas
from visionyard.api.exports.service import ExportService

router = APIRouter(prefix="/api/v1/export", tags=["export"], dependencies=[Depends(require_principal)])


def export_service(request: Request) -> ExportService:
    """The app's export use cases."""
    service: ExportService = request.app.state.exports
    return service


Service = Annotated[ExportService, Depends(export_service)]


@router.get("/capabilities", response_model=schemas.CapabilitiesResponse)
async def capabilities(
    service: Service, training_job_id: str | None = None, framework: str | None = None, task_type: str | None = None
) -> Any:
    """Export formats for a training job, or for a framework and task type."""
    return await service.capabilities(training_job_id=training_job_id, framework=framework, task_type=task_type)


@router.post("/jobs", response_model=schemas.ExportJobResponse, status_code=201)
async def create_export(body: schemas.CreateExportRequest, service: Service) -> Any:
    """Export a completed training job's stored checkpoint (best by default)."""
    return await service.create(body)


@router.get("/training/{training_job_id}/exports", response_model=schemas.ExportListResponse)
def list_exports(training_job_id: str, service: Service) -> Any:
    """Every export (version) of a training job."""
    return service.list_for_training_job(training_job_id)


@router.get("/jobs/{export_job_id}", response_model=schemas.ExportJobResponse)
def get_export(export_job_id: str, service: Service) -> Any:
    """One export job."""
    return service.get(export_job_id)


@router.post("/jobs/{export_job_id}/cancel", response_model=schemas.ExportJobResponse)
def cancel_export(export_job_id: str, service: Service) -> Any:
    """Stop an export: pending → cancelled, running → cancelling until the runner confirms."""
    return service.cancel(export_job_id)


@router.get("/{export_job_id}/download", response_model=schemas.DownloadResponse)
async def download(export_job_id: str, request: Request, service: Service) -> Any:
    """Where to download a completed export's package."""
    route = str(request.url_for("download_package", export_job_id=export_job_id))
    return await service.download(export_job_id, package_route=route)


@router.get("/{export_job_id}/package", name="download_package")
async def download_package(export_job_id: str, service: Service) -> FileResponse:
    """The package zip itself, fetched from storage (the local backend has no URL of its own)."""
    scratch = Path(tempfile.mkdtemp(prefix="vy-package-"))
    try:
        path, filename = await service.package(export_job_id, scratch / "package.zip")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return FileResponse(path, media_type="application/zip", filename=filename,
                        background=BackgroundTask(shutil.rmtree, scratch, True))
