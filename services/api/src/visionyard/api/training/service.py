"""Training job use cases: create, list, move through the state machine, read projections.

Every state change and the messages announcing it are written in one transaction (the outbox), so a
command is published if and only if the change was committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from visionyard.api import jobstate
from visionyard.api.auth.access import Role, project_filter, project_for_new_object, require_project_role
from visionyard.api.auth.principal import Principal
from visionyard.api.datasets.repository import DatasetRepository
from visionyard.api.db.models import TrainingJob, utcnow
from visionyard.api.db.models_access import Project
from visionyard.api.db.numbers import next_job_id
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, InvalidInput, NotFound
from visionyard.api.jobstate import JobAction, JobStatus
from visionyard.api.models.service import (
    CapabilitySource,
    check_dataset_format,
    default_primary_metric,
    resolve_trainer,
)
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.api.training import attempts, schemas
from visionyard.api.training.repository import JobRepository
from visionyard.shared import streams
from visionyard.shared.commands import CheckpointRef, TrainingConfig
from visionyard.shared.devices import InvalidDeviceRequest, device_request
from visionyard.shared.events import (
    JobCancelled,
    JobCancelRequested,
)
from visionyard.shared.scheduling import QueueRequest

T = TypeVar("T")
WRITE_RETRIES = 3


class TrackerPort(Protocol):
    """The tracker's answers about a job's MLflow run."""

    async def metrics(self, job_id: str) -> dict[str, Any]:
        """Metric histories of the job's run."""
        ...

    async def summary(self, job_id: str) -> dict[str, Any]:
        """Summary of the job's run."""
        ...


class TrainingService:
    """The training use cases, over a unit of work and two ports."""

    def __init__(self, *, uow: UnitOfWork, capabilities: CapabilitySource, tracker: TrackerPort) -> None:
        self._uow = uow
        self._capabilities = capabilities
        self._tracker = tracker

    # -- creating and listing ------------------------------------------------------------------

    async def validate_trainer(self, config: TrainingConfig) -> tuple[str, str, str]:
        """The job's (task type as the trainer spells it, primary metric, mode); InvalidInput naming the field."""
        manifests = await self._capabilities.manifests()
        manifest, task = resolve_trainer(
            manifests, framework=config.framework, model_name=config.model_name, task_type=config.task_type
        )
        try:
            device_request(config.advanced_config)
        except InvalidDeviceRequest as error:
            raise InvalidInput(f"config.{error.field}", error.reason) from None
        actual_format = await asyncio.to_thread(self._dataset_format, config.dataset_id)
        check_dataset_format(manifest, requested=config.dataset_format, actual=actual_format)
        metric, mode = default_primary_metric(config.task_type, manifest)
        return task, config.primary_metric or metric, config.primary_metric_mode or mode

    def _dataset_format(self, dataset_id: str) -> str | None:
        # None when the dataset is missing or not ready: create_job refuses those, naming the field.
        with self._uow.read() as session:
            dataset = DatasetRepository(session).get(dataset_id)
            return dataset.format if dataset is not None and dataset.content_hash is not None else None

    def create_job(
        self, request: schemas.CreateJobRequest, *, principal: Principal, task_type: str, primary_metric: str,
        primary_metric_mode: str,
    ) -> schemas.TrainingJobResponse:
        """Create a `pending` job pinned to the dataset's current version, in a project the caller works in."""
        config = request.config
        with self._uow.transaction() as session:
            project_id = project_for_new_object(session, principal, request.project_id)
            dataset = DatasetRepository(session).get(config.dataset_id)
            missing = f"config.dataset_id: dataset {config.dataset_id} not found"
            if dataset is None:
                raise NotFound(missing)
            require_project_role(session, principal, dataset.project_id, Role.VIEWER, not_found=missing)
            if dataset.content_hash is None:
                raise Conflict(f"config.dataset_id: dataset {dataset.id} is not ready: status is {dataset.status}")
            num_classes = config.num_classes
            if num_classes is None and dataset.num_classes >= 2:
                num_classes = dataset.num_classes
            job = TrainingJob(
                id=next_job_id(session, "training"),
                project_id=project_id,
                experiment_name=request.experiment_name or f"visionyard-{project_id}",
                tags=list(request.tags),
                notes=request.notes,
                framework=config.framework,
                model_name=config.model_name,
                task_type=task_type,
                num_classes=num_classes,
                dataset_id=dataset.id,
                dataset_snapshot_id=dataset.content_hash,
                dataset_format=config.dataset_format or dataset.format,
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                advanced_config=config.advanced_config,
                primary_metric=primary_metric,
                primary_metric_mode=primary_metric_mode,
                status=JobStatus.PENDING.value,
                attempt=1,
                created_at=utcnow(),
                priority=int(request.priority),
            )
            JobRepository(session).add(job)
            session.flush()
            return _response(session, job)

    def list_jobs(
        self, *, principal: Principal, project_id: int | None, status: str | None, limit: int, offset: int
    ) -> schemas.JobListResponse:
        """A page of the jobs the caller may see, newest first."""
        with self._uow.read() as session:
            visible = project_filter(session, principal)
            if project_id is not None:
                if visible is not None and str(project_id) not in visible:
                    raise NotFound(f"project_id: project {project_id} not found")
                visible = {str(project_id)}
            rows, total = JobRepository(session).list(projects=visible, status=status, limit=limit, offset=offset)
            jobs = [_response(session, row) for row in rows]
        return schemas.JobListResponse(jobs=jobs, total=total, limit=limit, offset=offset)

    def authorize(self, principal: Principal, job_id: str, need: Role) -> schemas.TrainingJobResponse:
        """The job when the caller's role in its project is at least `need` (NotFound when it may not see it)."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            require_project_role(session, principal, job.project_id, need, not_found=_missing(job_id))
            return _response(session, job)

    def get_job(self, job_id: str) -> schemas.TrainingJobResponse:
        """One job."""
        with self._uow.read() as session:
            return _response(session, _job(session, job_id))

    # -- the state machine ---------------------------------------------------------------------

    def start_job(
        self, job_id: str, *, resume: bool = False, checkpoint_path: str | None = None
    ) -> schemas.TrainingJobResponse:
        """pending → queued (outbox: `cmd.train` and the `queued` event); a job already on its way answers as is.

        The original frontend calls `start` right after `restart` (which already queued the job), and
        `start?resume=true&checkpoint_path=` to continue a finished job from one of its checkpoints.
        """

        def start(session: Session) -> schemas.TrainingJobResponse:
            job = _job(session, job_id, for_update=True)
            if resume or checkpoint_path:
                if job.status in jobstate.TERMINAL:
                    return self._queue(session, job_id, JobAction.RESUME, checkpoint_path=checkpoint_path)
                if job.status == JobStatus.PENDING:
                    raise Conflict(f"cannot resume job {job_id}: it has not run yet (status is pending); start it")
            if job.status in jobstate.ACTIVE:
                return _response(session, job)
            return self._queue(session, job_id, JobAction.START)

        return self._write(start)

    def restart_job(self, job_id: str) -> schemas.TrainingJobResponse:
        """A finished job → a new attempt from scratch, queued."""
        return self._write(lambda session: self._queue(session, job_id, JobAction.RESTART))

    def resume_job(self, job_id: str) -> schemas.TrainingJobResponse:
        """A finished job → a new attempt continuing from its last stored checkpoint, queued."""
        return self._write(lambda session: self._queue(session, job_id, JobAction.RESUME))

    def cancel_job(self, job_id: str) -> schemas.TrainingJobResponse:
        """pending/queued → cancelled; running → cancelling (the runner confirms with `cancelled`)."""

        def cancel(session: Session) -> schemas.TrainingJobResponse:
            job = _job(session, job_id, for_update=True)
            was = job.status
            target = jobstate.user_transition(job.id, was, JobAction.CANCEL)
            job.status = target.value
            outbox = OutboxRepository(session)
            if was != JobStatus.PENDING:
                # Durable record first: a runner that claims the command later still sees the cancel.
                outbox.add_kv_put(
                    bucket=streams.KV_CANCELLATIONS,
                    key=job.id,
                    value={"attempt": job.attempt},
                    message_id=f"cancel-{job.id}-{job.attempt}",
                )
            if target is JobStatus.CANCELLED:
                job.completed_at = utcnow()
                outbox.add(JobCancelled(job_id=job.id, attempt=job.attempt))
                attempts.mark_terminal(outbox, job)
            else:
                outbox.add(JobCancelRequested(job_id=job.id, attempt=job.attempt))
            session.flush()
            return _response(session, job)

        return self._write(cancel)

    def change_priority(
        self, job_id: str, priority: int, *, waiting_request: QueueRequest | None
    ) -> schemas.TrainingJobResponse:
        """A pending or waiting job's new priority; a waiting one's queue request is put again with it
        (`waiting_request`: the request as the queue holds it now, None when it holds none for this attempt).

        A waiting job keeps its place among jobs of its new priority (its queue time is unchanged). Should
        the scheduler admit the job between the read of its request and this write, the new request is
        stale and the scheduler deletes it: the job runs with the priority it was admitted at.
        """

        def change(session: Session) -> schemas.TrainingJobResponse:
            job = _job(session, job_id, for_update=True)
            if job.status in jobstate.WAITING:
                if waiting_request is None or waiting_request.attempt != job.attempt:
                    raise Conflict(f"priority: job {job_id} was already handed to a runner (or is still being "
                                   "queued); a running job's priority no longer matters")
                attempts.put_request(OutboxRepository(session),
                                     waiting_request.model_copy(update={"priority": priority}))
            elif job.status != JobStatus.PENDING:
                raise Conflict(f"priority: job {job_id} is {job.status}; only a pending or queued job's priority "
                               "can change")
            job.priority = priority
            session.flush()
            return _response(session, job)

        return self._write(change)

    def _queue(
        self, session: Session, job_id: str, action: JobAction, *, checkpoint_path: str | None = None
    ) -> schemas.TrainingJobResponse:
        job = _job(session, job_id, for_update=True)
        target = jobstate.user_transition(job.id, job.status, action)
        resume_from: CheckpointRef | None = None
        if action is JobAction.RESUME:
            resume_from = attempts.require_checkpoint(JobRepository(session), job, uri=checkpoint_path)
        if action in (JobAction.RESTART, JobAction.RESUME):
            attempts.begin_new_attempt(job)
        job.status = target.value
        attempts.queue_attempt(OutboxRepository(session), job, resume_from=resume_from)
        session.flush()
        return _response(session, job)

    def _write(self, use_case: Callable[[Session], T]) -> T:
        # A concurrent writer (the projector) bumped the row version: redo on fresh state.
        for attempt in range(WRITE_RETRIES):
            try:
                with self._uow.transaction() as session:
                    return use_case(session)
            except StaleDataError:
                if attempt == WRITE_RETRIES - 1:
                    raise Conflict("the job changed while this request ran; retry") from None
        raise AssertionError("unreachable")

    # -- projections -----------------------------------------------------------------------------

    def job_status(self, job_id: str) -> schemas.JobStatusResponse:
        """The job and its last 10 metric rows."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            metrics = JobRepository(session).metrics(job.id, limit=10, newest=True)
            return schemas.JobStatusResponse(
                job=_response(session, job),
                latest_metrics=[schemas.MetricResponse.model_validate(row) for row in metrics],
            )

    def metrics(self, job_id: str, *, limit: int) -> list[schemas.MetricResponse]:
        """The newest `limit` metric rows, oldest first: the last row is the newest epoch (the progress bar)."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            rows = JobRepository(session).metrics(job.id, limit=limit, newest=True)
            return [schemas.MetricResponse.model_validate(row) for row in rows]

    def metric_schema(self, job_id: str) -> schemas.MetricSchemaResponse:
        """Which metric names the job has reported."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            repo = JobRepository(session)
            names: set[str] = set()
            count = repo.metric_count(job.id)
            for row in repo.metrics(job.id, limit=max(count, 1)):
                names.update(column for column in ("loss", "accuracy", "learning_rate") if getattr(row, column) is not None)
                names.update((row.extra_metrics or {}).keys())
            return schemas.MetricSchemaResponse(
                job_id=int(job.id), framework=job.framework, task_type=job.task_type, primary_metric=job.primary_metric,
                primary_metric_mode=job.primary_metric_mode, available_metrics=sorted(names), metric_count=count,
            )

    def logs(self, job_id: str, *, limit: int, log_type: str | None) -> list[schemas.LogResponse]:
        """The newest `limit` log lines, oldest first."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            rows = JobRepository(session).logs(job.id, limit=limit, log_type=log_type)
            return [schemas.LogResponse.from_row(row) for row in rows]

    def checkpoints(self, job_id: str) -> schemas.CheckpointsResponse:
        """The job's stored checkpoints."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            rows = [row for row in JobRepository(session).checkpoints(job.id) if row.status == "stored"]
            return schemas.CheckpointsResponse(
                checkpoints=[schemas.CheckpointResponse.model_validate(row) for row in rows]
            )

    async def mlflow_metrics(self, job: schemas.TrainingJobResponse) -> dict[str, Any]:
        """The tracker's metric history, plus what only the API knows."""
        # The tracker and MLflow know the job by its internal id: the decimal string.
        return {**await self._tracker.metrics(str(job.id)), **_metric_context(job)}

    async def mlflow_summary(self, job: schemas.TrainingJobResponse) -> dict[str, Any]:
        """The tracker's run summary, plus what only the API knows."""
        return {**await self._tracker.summary(str(job.id)), **_metric_context(job)}


def _missing(job_id: str) -> str:
    return f"job_id: training job {job_id} not found"


def _job(session: Session, job_id: str, *, for_update: bool = False) -> TrainingJob:
    job = JobRepository(session).get(job_id, for_update=for_update)
    if job is None:
        raise NotFound(_missing(job_id))
    return job


def _response(session: Session, job: TrainingJob) -> schemas.TrainingJobResponse:
    """The job as the frontend reads it, with its project's name."""
    name = session.scalar(select(Project.name).where(Project.id == int(job.project_id))) if job.project_id.isdigit() else None
    return schemas.TrainingJobResponse.model_validate(job).model_copy(update={"project_name": name})


def _metric_context(job: schemas.TrainingJobResponse) -> dict[str, Any]:
    return {
        "primary_metric": job.primary_metric,
        "primary_metric_mode": job.primary_metric_mode,
        "task_type": job.task_type,
        "framework": job.framework,
    }
