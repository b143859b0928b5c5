"""HTTP adapter of the training use cases (`/api/v1/training`, API.md; frontend-contract.md wins).

Job ids are integers on the wire. Every route loads the job and checks the caller's role in its
project first: another project's job is "not found", a viewer reads but cannot start or cancel.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.jobstate import WAITING, JobStatus
from visionyard.api.scheduling.endpoints import Service as Queues
from visionyard.api.training import schemas
from visionyard.api.training.service import TrainingService

router = APIRouter(prefix="/api/v1/training", tags=["training"])

def training_service(request: Request) -> TrainingService:
    """The app's training use cases."""
    service: TrainingService = request.app.state.training
    return service


Service = Annotated[TrainingService, Depends(training_service)]


async def _authorized(service: TrainingService, principal: CurrentPrincipal, job_id: int, need: Role) -> Any:
    return await run_in_threadpool(service.authorize, principal, str(job_id), need)


@router.post("/jobs", status_code=201, response_model=schemas.TrainingJobResponse)
async def create_job(body: schemas.CreateJobRequest, service: Service, principal: CurrentPrincipal) -> Any:
    """Create a `pending` training job (in the caller's default project when none is named)."""
    task, metric, mode = await service.validate_trainer(body.config)
    return await run_in_threadpool(
        service.create_job, body, principal=principal, task_type=task, primary_metric=metric,
        primary_metric_mode=mode,
    )


@router.get("/jobs", response_model=schemas.JobListResponse)
async def list_jobs(
    service: Service,
    principal: CurrentPrincipal,
    project_id: int | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    """The caller's jobs, newest first, with the total count."""
    return await run_in_threadpool(
        service.list_jobs, principal=principal, project_id=project_id, status=status.value if status else None,
        limit=limit, offset=offset,
    )


@router.get("/jobs/{job_id}", response_model=schemas.TrainingJobResponse)
async def get_job(job_id: int, service: Service, principal: CurrentPrincipal, queues: Queues) -> Any:
    """One job; a waiting one with `queue`: its position, why it waits and, when one can be made, an estimate."""
    job: schemas.TrainingJobResponse = await _authorized(service, principal, job_id, Role.VIEWER)
    return job.model_copy(update={"queue": await queues.position(job)})


@router.patch("/jobs/{job_id}/priority", response_model=schemas.TrainingJobResponse)
async def change_priority(
    job_id: int, body: schemas.PriorityRequest, service: Service, principal: CurrentPrincipal, queues: Queues
) -> Any:
    """Change a pending or queued job's priority (`low`, `normal`, `high` or an integer); it keeps its queue time."""
    job: schemas.TrainingJobResponse = await _authorized(service, principal, job_id, Role.MEMBER)
    waiting = await queues.waiting_request(str(job_id)) if job.status in {s.value for s in WAITING} else None
    return await run_in_threadpool(service.change_priority, str(job_id), int(body.priority), waiting_request=waiting)


@router.post("/jobs/{job_id}/start", response_model=schemas.TrainingJobResponse)
async def start_job(
    job_id: int,
    service: Service,
    principal: CurrentPrincipal,
    resume: bool = False,
    checkpoint_path: Annotated[str | None, Query(max_length=2048)] = None,
) -> Any:
    """pending → queued; a job already queued or running answers as is; `resume=true` continues a finished job
    from `checkpoint_path` (one of its stored checkpoints) or from its last stored checkpoint."""
    await _authorized(service, principal, job_id, Role.MEMBER)
    return await run_in_threadpool(service.start_job, str(job_id), resume=resume, checkpoint_path=checkpoint_path)


@router.post("/jobs/{job_id}/cancel", response_model=schemas.TrainingJobResponse)
async def cancel_job(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """Cancel a pending, queued or running job."""
    await _authorized(service, principal, job_id, Role.MEMBER)
    return await run_in_threadpool(service.cancel_job, str(job_id))


@router.post("/jobs/{job_id}/restart", response_model=schemas.TrainingJobResponse)
async def restart_job(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """A new attempt of a finished job, from scratch."""
    await _authorized(service, principal, job_id, Role.MEMBER)
    return await run_in_threadpool(service.restart_job, str(job_id))


@router.post("/jobs/{job_id}/resume", response_model=schemas.TrainingJobResponse)
async def resume_job(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """A new attempt of a finished job, from its last stored checkpoint."""
    await _authorized(service, principal, job_id, Role.MEMBER)
    return await run_in_threadpool(service.resume_job, str(job_id))


@router.get("/jobs/{job_id}/status", response_model=schemas.JobStatusResponse)
async def job_status(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """The job and its latest 10 metric rows."""
    await _authorized(service, principal, job_id, Role.VIEWER)
    return await run_in_threadpool(service.job_status, str(job_id))


@router.get("/jobs/{job_id}/metrics", response_model=list[schemas.MetricResponse])
async def job_metrics(
    job_id: int, service: Service, principal: CurrentPrincipal, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> Any:
    """The newest `limit` metric rows, oldest first (the last row is the newest epoch)."""
    await _authorized(service, principal, job_id, Role.VIEWER)
    return await run_in_threadpool(service.metrics, str(job_id), limit=limit)


@router.get("/jobs/{job_id}/metric-schema", response_model=schemas.MetricSchemaResponse)
async def metric_schema(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """The metrics a job reports and which one it optimizes."""
    await _authorized(service, principal, job_id, Role.VIEWER)
    return await run_in_threadpool(service.metric_schema, str(job_id))


@router.get("/jobs/{job_id}/logs", response_model=list[schemas.LogResponse])
async def job_logs(
    job_id: int,
    service: Service,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    log_type: str | None = None,
) -> Any:
    """The newest `limit` log lines (of `log_type`: stdout, stderr or an event type), oldest first: a bare array."""
    await _authorized(service, principal, job_id, Role.VIEWER)
    return await run_in_threadpool(service.logs, str(job_id), limit=limit, log_type=log_type)


@router.get("/jobs/{job_id}/checkpoints", response_model=schemas.CheckpointsResponse)
async def job_checkpoints(job_id: int, service: Service, principal: CurrentPrincipal) -> Any:
    """The job's stored checkpoints."""
    await _authorized(service, principal, job_id, Role.VIEWER)
    return await run_in_threadpool(service.checkpoints, str(job_id))


@router.get("/jobs/{job_id}/mlflow/metrics")
async def mlflow_metrics(job_id: int, service: Service, principal: CurrentPrincipal) -> dict[str, Any]:
    """Metric histories from MLflow (answered by the tracker)."""
    job = await _authorized(service, principal, job_id, Role.VIEWER)
    return await service.mlflow_metrics(job)


@router.get("/jobs/{job_id}/mlflow/summary")
async def mlflow_summary(job_id: int, service: Service, principal: CurrentPrincipal) -> dict[str, Any]:
    """The MLflow run summary (answered by the tracker)."""
    job = await _authorized(service, principal, job_id, Role.VIEWER)
    return await service.mlflow_summary(job)
