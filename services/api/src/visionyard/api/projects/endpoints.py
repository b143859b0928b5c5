"""HTTP adapter of the project use cases (`/api/v1/projects`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import CurrentPrincipal
from visionyard.api.projects import schemas
from visionyard.api.projects.service import ProjectService
from visionyard.api.training.schemas import TrainingJobResponse

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


def project_service(request: Request) -> ProjectService:
    """The app's project use cases."""
    service: ProjectService = request.app.state.projects
    return service


Service = Annotated[ProjectService, Depends(project_service)]


@router.get("", response_model=list[schemas.ProjectResponse])
async def list_projects(principal: CurrentPrincipal, service: Service) -> Any:
    """The caller's projects."""
    return await run_in_threadpool(service.list, principal)


@router.post("", response_model=schemas.ProjectResponse, status_code=201)
async def create_project(body: schemas.CreateProjectRequest, principal: CurrentPrincipal, service: Service) -> Any:
    """A new project owned by the caller."""
    return await run_in_threadpool(service.create, principal, body)


@router.get("/{project_id}", response_model=schemas.ProjectResponse)
async def get_project(project_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """One project."""
    return await run_in_threadpool(service.get, principal, project_id)


@router.put("/{project_id}", response_model=schemas.ProjectResponse)
async def update_project(
    project_id: int, body: schemas.UpdateProjectRequest, principal: CurrentPrincipal, service: Service
) -> Any:
    """Edit a project (owners)."""
    return await run_in_threadpool(service.update, principal, project_id, body)


@router.delete("/{project_id}", response_model=schemas.DeletedResponse)
async def delete_project(project_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """Delete an empty project (owners)."""
    return await run_in_threadpool(service.delete, principal, project_id)


@router.get("/{project_id}/experiments", response_model=list[TrainingJobResponse])
async def project_experiments(project_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """The project's training jobs, newest first."""
    return await run_in_threadpool(service.experiments, principal, project_id)


@router.get("/{project_id}/members", response_model=list[schemas.MemberResponse])
async def project_members(project_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """The project's members."""
    return await run_in_threadpool(service.members, principal, project_id)


@router.post("/{project_id}/members", response_model=list[schemas.MemberResponse], status_code=201)
async def add_member(
    project_id: int, body: schemas.AddMemberRequest, principal: CurrentPrincipal, service: Service
) -> Any:
    """Add a user by email, or change a member's role (owners)."""
    return await run_in_threadpool(service.add_member, principal, project_id, body)


@router.delete("/{project_id}/members/{user_id}", response_model=schemas.DeletedResponse)
async def remove_member(project_id: int, user_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """Remove a member (owners), or leave a project."""
    return await run_in_threadpool(service.remove_member, principal, project_id, user_id)
