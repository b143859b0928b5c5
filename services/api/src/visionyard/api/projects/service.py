"""Project use cases: create, list, read, edit, delete, and manage members."""

from __future__ import annotations

import builtins  # `ProjectService.list` shadows the builtin in the class's later annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from visionyard.api.auth.access import (
    Role,
    project_filter,
    require_project_role,
    role_in,
)
from visionyard.api.auth.principal import Principal
from visionyard.api.db.models import Dataset, TrainingJob
from visionyard.api.db.models_access import Project, ProjectMember, User
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
)
from visionyard.api.projects import schemas
from visionyard.api.training.schemas import TrainingJobResponse


def _not_found(project_id: int | str) -> str:
    return f"project_id: project {project_id} not found"


class ProjectService:
    """Projects over the platform database."""

    def __init__(self, *, uow: UnitOfWork) -> None:
        self._uow = uow

    def create(self, principal: Principal, request: schemas.CreateProjectRequest) -> schemas.ProjectResponse:
        """A project owned by the caller; its names are unique per owner."""
        if principal.user_id is None or principal.read_only or principal.key_projects is not None:
            raise Forbidden("creating a project needs a user's login (not a project-scoped key)")
        name = request.name.strip()
        if not name:
            raise InvalidInput("name", "must not be blank")
        with self._uow.transaction() as session:
            taken = session.scalar(select(Project.id).where(Project.owner_id == principal.user_id, Project.name == name))
            if taken is not None:
                raise BadRequest(f"name: a project named {name!r} already exists")
            project = Project(name=name, description=request.description, task_type=request.task_type,
                              owner_id=principal.user_id)
            session.add(project)
            session.flush()
            session.add(ProjectMember(project_id=project.id, user_id=principal.user_id, role="owner"))
            session.flush()
            return _response(session, project, Role.OWNER)

    def list(self, principal: Principal) -> list[schemas.ProjectResponse]:
        """The projects the caller belongs to (every project for an admin), most recently updated first."""
        with self._uow.read() as session:
            visible = project_filter(session, principal)
            query = select(Project).order_by(Project.updated_at.desc(), Project.id.desc())
            if visible is not None:
                query = query.where(Project.id.in_([int(pid) for pid in visible]))
            return [_response(session, project, role_in(session, principal, str(project.id)))
                    for project in session.scalars(query)]

    def get(self, principal: Principal, project_id: int) -> schemas.ProjectResponse:
        """One project the caller belongs to."""
        with self._uow.read() as session:
            project, role = _project(session, principal, project_id, Role.VIEWER)
            return _response(session, project, role)

    def update(self, principal: Principal, project_id: int, request: schemas.UpdateProjectRequest) -> schemas.ProjectResponse:
        """Edit a project (owners)."""
        with self._uow.transaction() as session:
            project, role = _project(session, principal, project_id, Role.OWNER)
            changes = request.model_dump(exclude_unset=True)
            if "name" in changes:
                if changes["name"] is None or not changes["name"].strip():
                    raise InvalidInput("name", "must not be blank")
                changes["name"] = changes["name"].strip()
                # The same rule as create: an owner's project names are unique (the page reads this 400).
                taken = session.scalar(select(Project.id).where(Project.owner_id == project.owner_id,
                                                                Project.name == changes["name"],
                                                                Project.id != project.id))
                if taken is not None:
                    raise BadRequest(f"name: a project named {changes['name']!r} already exists")
            for name, value in changes.items():
                setattr(project, name, value)
            session.flush()
            return _response(session, project, role)

    def delete(self, principal: Principal, project_id: int) -> schemas.DeletedResponse:
        """Delete an empty project (owners); one that still holds datasets or jobs is refused, naming them."""
        with self._uow.transaction() as session:
            project, _ = _project(session, principal, project_id, Role.OWNER)
            jobs, datasets = _counts(session, project.id)
            if jobs or datasets:
                raise Conflict(
                    f"project {project_id} still has {jobs} training job(s) and {datasets} dataset(s): delete them first"
                )
            session.delete(project)
            return schemas.DeletedResponse(message=f"project {project_id} deleted")

    def experiments(self, principal: Principal, project_id: int) -> builtins.list[TrainingJobResponse]:
        """The project's training jobs, newest first."""
        with self._uow.read() as session:
            project, _ = _project(session, principal, project_id, Role.VIEWER)
            rows = session.scalars(
                select(TrainingJob).where(TrainingJob.project_id == str(project.id))
                .order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc())
            )
            return [TrainingJobResponse.model_validate(row).model_copy(update={"project_name": project.name})
                    for row in rows]

    def members(self, principal: Principal, project_id: int) -> builtins.list[schemas.MemberResponse]:
        """Who is in the project."""
        with self._uow.read() as session:
            project, _ = _project(session, principal, project_id, Role.VIEWER)
            return _members(session, project)

    def add_member(self, principal: Principal, project_id: int, request: schemas.AddMemberRequest) -> builtins.list[schemas.MemberResponse]:
        """Add an existing user with a role, or change an existing member's role (owners)."""
        with self._uow.transaction() as session:
            project, _ = _project(session, principal, project_id, Role.OWNER)
            user = session.scalars(select(User).where(User.email == request.email.strip().lower())).first()
            if user is None:
                raise NotFound(f"email: no user with email {request.email}")
            if user.id == project.owner_id and request.role != "owner":
                raise InvalidInput("role", "the project's owner stays its owner")
            member = session.scalars(select(ProjectMember).where(ProjectMember.project_id == project.id,
                                                                 ProjectMember.user_id == user.id)).first()
            if member is None:
                session.add(ProjectMember(project_id=project.id, user_id=user.id, role=request.role))
            else:
                member.role = request.role
            session.flush()
            return _members(session, project)

    def remove_member(self, principal: Principal, project_id: int, user_id: int) -> schemas.DeletedResponse:
        """Remove a member (owners; anyone may leave); the owner cannot be removed."""
        with self._uow.transaction() as session:
            leaving = principal.user_id == user_id
            project, _ = _project(session, principal, project_id, Role.VIEWER if leaving else Role.OWNER)
            if user_id == project.owner_id:
                raise InvalidInput("user_id", "the project's owner cannot be removed")
            member = session.scalars(select(ProjectMember).where(ProjectMember.project_id == project.id,
                                                                 ProjectMember.user_id == user_id)).first()
            if member is None:
                raise NotFound(f"user_id: user {user_id} is not a member of project {project_id}")
            session.delete(member)
            return schemas.DeletedResponse(message=f"user {user_id} removed from project {project_id}")


def _project(session: Session, principal: Principal, project_id: int, need: Role) -> tuple[Project, Role]:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(_not_found(project_id))
    role = require_project_role(session, principal, str(project_id), need, not_found=_not_found(project_id))
    return project, role


def _counts(session: Session, project_id: int) -> tuple[int, int]:
    key = str(project_id)
    jobs = session.scalar(select(func.count()).select_from(TrainingJob).where(TrainingJob.project_id == key)) or 0
    datasets = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.project_id == key)) or 0
    return jobs, datasets


def _response(session: Session, project: Project, role: Role | None) -> schemas.ProjectResponse:
    jobs, datasets = _counts(session, project.id)
    members = session.scalar(
        select(func.count()).select_from(ProjectMember).where(ProjectMember.project_id == project.id)
    ) or 0
    return schemas.ProjectResponse(
        id=project.id, name=project.name, description=project.description, task_type=project.task_type,
        user_id=project.owner_id, user_role=role.name.lower() if role else None, experiment_count=jobs,
        dataset_count=datasets, member_count=members, created_at=project.created_at, updated_at=project.updated_at,
    )


def _members(session: Session, project: Project) -> list[schemas.MemberResponse]:
    rows = session.execute(
        select(ProjectMember, User).join(User, User.id == ProjectMember.user_id)
        .where(ProjectMember.project_id == project.id).order_by(ProjectMember.id)
    ).all()
    return [
        schemas.MemberResponse(user_id=user.id, email=user.email, full_name=user.full_name, role=member.role,
                               is_owner=user.id == project.owner_id, badge_color=user.badge_color,
                               joined_at=member.created_at)
        for member, user in rows
    ]
