"""HTTP adapter of the training use cases (`/api/v1/training`, API.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, authorize_project, require_principal
from visionyard.api.jobstate import JobStatus
from visionyard.api.training import schemas
from visionyard.api.training.service import TrainingService

router = APIRouter(prefix="/api/v1/training", tags=["training"], dependencies=[Depends(require_principal)])


def training_service(request: Request) -> TrainingService:
    """The app's training use cases."""
    service: TrainingService = request.app.state.training
    return service


Service = Annotated[TrainingService, Depends(training_service)]


@router.post("/jobs", status_code=201, response_model=schemas.TrainingJobResponse)
async def create_job(body: schemas.CreateJobRequest, service: Service, principal: CurrentPrincipal) -> Any:
    """Create a `pending` training job."""
    authorize_project(principal, body.project_id or "default")
    task, metric, mode = await service.validate_trainer(body.config)
    return await run_in_threadpool(
        service.create_job, body, task_type=task, primary_metric=metric, primary_metric_mode=mode
    )


@router.get("/jobs", response_model=schemas.JobListResponse)
def list_jobs(
    service: Service,
    principal: CurrentPrincipal,
    project_id: str | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    """Jobs, newest first, with the total count."""
    if project_id:
        authorize_project(principal, project_id)
    return service.list_jobs(project_id=project_id, status=status.value if status else None, limit=limit, offset=offset)


def _visible_job(service: TrainingService, principal: CurrentPrincipal, job_id: str) -> schemas.TrainingJobResponse:
    job = service.get_job(job_id)
    authorize_project(principal, job.project_id)
    return job


@router.get("/jobs/{job_id}", response_model=schemas.TrainingJobResponse)
def get_job(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """One job."""
    return _visible_job(service, principal, job_id)


@router.post("/jobs/{job_id}/start", response_model=schemas.TrainingJobResponse)
def start_job(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """pending → queued."""
    _visible_job(service, principal, job_id)
    return service.start_job(job_id)


@router.post("/jobs/{job_id}/cancel", response_model=schemas.TrainingJobResponse)
def cancel_job(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """Cancel a pending, queued or running job."""
    _visible_job(service, principal, job_id)
    return service.cancel_job(job_id)


@router.post("/jobs/{job_id}/restart", response_model=schemas.TrainingJobResponse)
def restart_job(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """A new attempt of a finished job, from scratch."""
    _visible_job(service, principal, job_id)
    return service.restart_job(job_id)


@router.post("/jobs/{job_id}/resume", response_model=schemas.TrainingJobResponse)
def resume_job(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """A new attempt of a finished job, from its last stored checkpoint."""
    _visible_job(service, principal, job_id)
    return service.resume_job(job_id)


@router.get("/jobs/{job_id}/status", response_model=schemas.JobStatusResponse)
def job_status(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """The job and its latest 10 metric rows."""
    _visible_job(service, principal, job_id)
    return service.job_status(job_id)


@router.get("/jobs/{job_id}/metrics", response_model=list[schemas.MetricResponse])
def job_metrics(
    job_id: str, service: Service, principal: CurrentPrincipal, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> Any:
    """Metric rows, oldest first."""
    _visible_job(service, principal, job_id)
    return service.metrics(job_id, limit=limit)


@router.get("/jobs/{job_id}/metric-schema", response_model=schemas.MetricSchemaResponse)
def metric_schema(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """The metrics a job reports and which one it optimizes."""
    _visible_job(service, principal, job_id)
    return service.metric_schema(job_id)


@router.get("/jobs/{job_id}/logs", response_model=schemas.LogsResponse)
def job_logs(
    job_id: str,
    service: Service,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    log_type: str | None = None,
) -> Any:
    """The newest `limit` log lines (of `log_type`: stdout, stderr or an event type), oldest first."""
    _visible_job(service, principal, job_id)
    return service.logs(job_id, limit=limit, log_type=log_type)


@router.get("/jobs/{job_id}/checkpoints", response_model=schemas.CheckpointsResponse)
def job_checkpoints(job_id: str, service: Service, principal: CurrentPrincipal) -> Any:
    """The job's stored checkpoints."""
    _visible_job(service, principal, job_id)
    return service.checkpoints(job_id)


@router.get("/jobs/{job_id}/mlflow/metrics")
async def mlflow_metrics(job_id: str, service: Service, principal: CurrentPrincipal) -> dict[str, Any]:
    """Metric histories from MLflow (answered by the tracker)."""
    job = await run_in_threadpool(_visible_job, service, principal, job_id)
    return await service.mlflow_metrics(job)


@router.get("/jobs/{job_id}/mlflow/summary")
async def mlflow_summary(job_id: str, service: Service, principal: CurrentPrincipal) -> dict[str, Any]:
    """The MLflow run summary (answered by the tracker)."""
    job = await run_in_threadpool(_visible_job, service, principal, job_id)
    return await service.mlflow_summary(job)


@router.post("/jobs/{job_id}/callback/progress", response_model=schemas.CallbackResponse)
def progress_callback(job_id: str, body: schemas.ProgressCallback, service: Service) -> Any:
    """HTTP progress ingress for trainers without the SDK pipe."""
    return service.report_progress(job_id, body)


@router.post("/jobs/{job_id}/callback/completion", response_model=schemas.CallbackResponse)
def completion_callback(job_id: str, body: schemas.CompletionCallback, service: Service) -> Any:
    """HTTP completion ingress."""
    return service.report_completion(job_id, body)


@router.post("/jobs/{job_id}/callback/logs", response_model=schemas.CallbackResponse)
def log_callback(job_id: str, body: schemas.LogCallback, service: Service) -> Any:
    """HTTP log ingress."""
    return service.report_log(job_id, body)
