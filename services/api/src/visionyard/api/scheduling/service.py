"""Queue use cases of the REST routes: where a job stands, every queue's depth, a project's weight and quotas.

The scheduler (an elected API replica) writes what it decided into KV (`sched_status`); any replica
answers these routes from there, so a request never waits on the scheduler and never needs the leader.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.auth.access import Role, project_filter, require_project_role
from visionyard.api.auth.principal import Principal
from visionyard.api.db.models_access import Project
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import NotFound
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.api.scheduling import schemas
from visionyard.api.training.schemas import QueuePosition, TrainingJobResponse
from visionyard.shared import streams
from visionyard.shared.scheduling import (
    JobPosition,
    PositionShard,
    ProjectPolicy,
    QueueRequest,
    QueueSummary,
    position_shard,
    priority_name,
)

# Status older than this means no replica is scheduling (the leader writes the summary every 5 s and a
# new one takes over within the lease's TTL).
STALE_AFTER_SECONDS = 20.0


class QueueStatusReader(Protocol):
    """What the scheduler wrote, and the queue's own entries (adapters/scheduling_kv.py)."""

    async def summary(self) -> QueueSummary | None:
        """The `summary` entry of `sched_status`."""
        ...

    async def shard(self, key: str) -> PositionShard | None:
        """One `jobs.<n>` entry of `sched_status`."""
        ...

    async def request(self, job_id: str) -> QueueRequest | None:
        """A job's entry in `sched_requests`."""
        ...


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _stale(updated_at: float) -> bool:
    return time.time() - updated_at > STALE_AFTER_SECONDS


class QueueService:
    """The queue as REST shows and changes it."""

    def __init__(self, *, uow: UnitOfWork, status: QueueStatusReader) -> None:
        self._uow = uow
        self._status = status

    async def waiting_request(self, job_id: str) -> QueueRequest | None:
        """The job's request as the queue holds it (None once admitted, or not relayed yet)."""
        return await self._status.request(job_id)

    async def position(self, job: TrainingJobResponse) -> QueuePosition | None:
        """Where a waiting job stands (None: not waiting, or the scheduler has not seen its attempt yet)."""
        if job.status not in {status.value for status in jobstate.WAITING}:
            return None
        shard = await self._status.shard(position_shard(str(job.id)))
        if shard is None:
            return None
        found: JobPosition | None = shard.jobs.get(str(job.id))
        if found is None:
            return None
        estimate = found.estimated_start_seconds
        return QueuePosition(
            position=found.position, jobs_ahead=found.jobs_ahead, reason=found.reason, detail=found.detail,
            queue=found.queue, estimated_start_seconds=estimate,
            estimated_start_at=_moment(shard.updated_at + estimate) if estimate is not None else None,
            updated_at=_moment(shard.updated_at), stale=_stale(shard.updated_at),
        )

    async def queues(self, principal: Principal) -> schemas.QueuesResponse:
        """Every queue's depth by project and priority, limited to the projects the caller may see."""
        summary = await self._status.summary()
        if summary is None:
            return schemas.QueuesResponse(updated_at=None, scheduler=None, stale=True, admitted_per_second=0.0,
                                          capacity=schemas.CapacityResponse(runners=0, slots=0, free_slots=0, gpus=0,
                                                                            free_gpus=0), queues=[])
        visible, names = self._visible_projects(principal, {p.project_id for q in summary.queues for p in q.projects})
        queues = []
        for queue in summary.queues:
            projects = [
                schemas.ProjectQueueResponse(
                    project_id=int(p.project_id) if p.project_id.isdigit() else p.project_id,
                    project_name=names.get(p.project_id), waiting=p.waiting, running=p.running,
                    by_priority={priority_name(int(level)) or level: count for level, count in p.by_priority.items()},
                    weight=p.weight, max_running_jobs=p.max_running_jobs, max_gpus=p.max_gpus,
                    gpus_in_use=p.gpus_in_use,
                )
                for p in queue.projects if visible is None or p.project_id in visible
            ]
            if projects or visible is None:
                queues.append(schemas.QueueResponse(queue=queue.queue, waiting=sum(p.waiting for p in projects),
                                                    running=sum(p.running for p in projects), projects=projects))
        return schemas.QueuesResponse(
            updated_at=_moment(summary.updated_at), scheduler=summary.scheduler, stale=_stale(summary.updated_at),
            admitted_per_second=summary.admitted_per_second,
            capacity=schemas.CapacityResponse(**summary.capacity.model_dump()), queues=queues,
        )

    async def depth(self) -> schemas.QueueDepthResponse:
        """Waiting and running jobs over every queue and project, and the slots."""
        summary = await self._status.summary()
        if summary is None:
            return schemas.QueueDepthResponse(waiting=0, running=0, slots=0, free_slots=0, updated_at=None, stale=True)
        return schemas.QueueDepthResponse(
            waiting=sum(queue.waiting for queue in summary.queues), running=sum(queue.running for queue in summary.queues),
            slots=summary.capacity.slots, free_slots=summary.capacity.free_slots,
            updated_at=_moment(summary.updated_at), stale=_stale(summary.updated_at),
        )

    def _visible_projects(self, principal: Principal, project_ids: set[str]) -> tuple[set[str] | None, dict[str, str]]:
        with self._uow.read() as session:
            visible = project_filter(session, principal)
            numeric = [int(pid) for pid in project_ids if pid.isdigit()]
            names = {str(pid): name for pid, name in session.execute(select(Project.id, Project.name)
                                                                      .where(Project.id.in_(numeric)))}
        return visible, names

    def project_policy(self, principal: Principal, project_id: int) -> schemas.ProjectSchedulingResponse:
        """A project's weight and quotas (any member may read them)."""
        with self._uow.read() as session:
            project = _project(session, principal, project_id, Role.VIEWER)
            return _policy_response(project)

    def set_project_policy(
        self, principal: Principal, project_id: int, request: schemas.ProjectSchedulingRequest
    ) -> schemas.ProjectSchedulingResponse:
        """Set a project's weight and quotas (its owner or an admin); the scheduler applies them at once."""
        with self._uow.transaction() as session:
            project = _project(session, principal, project_id, Role.OWNER)
            project.share_weight = request.weight
            project.max_running_jobs = request.max_running_jobs
            project.max_gpus = request.max_gpus
            policy = ProjectPolicy(weight=request.weight, max_running_jobs=request.max_running_jobs,
                                   max_gpus=request.max_gpus)
            OutboxRepository(session).add_kv_put(
                bucket=streams.KV_SCHED_PROJECTS, key=str(project.id), value=policy.model_dump(mode="json"),
                message_id=f"policy-{project.id}-{time.time_ns()}",
            )
            session.flush()
            return _policy_response(project)


def _project(session: Session, principal: Principal, project_id: int, need: Role) -> Project:
    missing = f"project_id: project {project_id} not found"
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(missing)
    require_project_role(session, principal, str(project_id), need, not_found=missing)
    return project


def _policy_response(project: Project) -> schemas.ProjectSchedulingResponse:
    return schemas.ProjectSchedulingResponse(project_id=project.id, weight=project.share_weight,
                                             max_running_jobs=project.max_running_jobs, max_gpus=project.max_gpus)
