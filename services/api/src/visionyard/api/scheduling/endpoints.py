"""HTTP adapter of the queue use cases: `GET /api/v1/queues`, `GET|PUT /api/v1/projects/{id}/scheduling`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal
from visionyard.api.scheduling import schemas
from visionyard.api.scheduling.service import QueueService

router = APIRouter(prefix="/api/v1", tags=["queues"])


def queue_service(request: Request) -> QueueService:
    """The app's queue use cases."""
    service: QueueService = request.app.state.queues
    return service


Service = Annotated[QueueService, Depends(queue_service)]


@router.get("/queues", response_model=schemas.QueuesResponse)
async def list_queues(principal: CurrentPrincipal, service: Service) -> Any:
    """Every queue's waiting and running jobs by project and priority (the caller's projects), and the capacity."""
    return await service.queues(principal)


@router.get("/queues/depth", response_model=schemas.QueueDepthResponse, tags=["operations"])
async def queue_depth(service: Service) -> Any:
    """How many training jobs wait and run in all, and the runners' slots: counts only, no project's data.
    Public like `/metrics`: what an autoscaler (KEDA's metrics-api trigger) scales runners on."""
    return await service.depth()


@router.get("/projects/{project_id}/scheduling", response_model=schemas.ProjectSchedulingResponse)
async def project_scheduling(project_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """A project's fair-share weight and quotas."""
    return await run_in_threadpool(service.project_policy, principal, project_id)


@router.put("/projects/{project_id}/scheduling", response_model=schemas.ProjectSchedulingResponse)
async def set_project_scheduling(
    project_id: int, body: schemas.ProjectSchedulingRequest, principal: CurrentPrincipal, service: Service
) -> Any:
    """Set a project's weight and quotas (its owner or an admin); null quotas mean no limit."""
    return await run_in_threadpool(service.set_project_policy, principal, project_id, body)
