"""Project roles and the checks every route makes: another project's objects are not found, a viewer only reads."""

from __future__ import annotations

from enum import IntEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from visionyard.api.auth.principal import Principal
from visionyard.api.db.models_access import ProjectMember
from visionyard.api.errors import Forbidden, NotFound


class Role(IntEnum):
    """A member's role, ordered by what it allows."""

    VIEWER = 1  # reads everything in the project
    MEMBER = 2  # also creates datasets and jobs, starts and cancels them
    OWNER = 3  # also edits and deletes the project and manages its members


def role_in(session: Session, principal: Principal, project_id: str) -> Role | None:
    """The caller's role in a project, or None when it may not see it at all."""
    if principal.key_projects is not None and project_id not in principal.key_projects:
        return None
    role: Role | None
    if principal.is_admin:
        role = Role.OWNER
    elif principal.user_id is None or not project_id.isdigit():
        role = None
    else:
        name = session.scalar(
            select(ProjectMember.role).where(
                ProjectMember.project_id == int(project_id), ProjectMember.user_id == principal.user_id
            )
        )
        role = Role[name.upper()] if name else None
    if role is not None and principal.read_only:
        role = Role.VIEWER
    return role


def require_project_role(
    session: Session, principal: Principal, project_id: str, need: Role, *, not_found: str
) -> Role:
    """The caller's role when it is at least `need`.

    Raises NotFound with `not_found` (the very message a missing object gets, so nothing leaks) when the
    caller is not in the project, and Forbidden when its role is too low.
    """
    role = role_in(session, principal, project_id)
    if role is None:
        raise NotFound(not_found)
    if role < need:
        raise Forbidden(
            f"project {project_id}: your role is {role.name.lower()}; this needs {need.name.lower()} or above"
        )
    return role


def project_filter(session: Session, principal: Principal) -> set[str] | None:
    """The project ids a listing may show the caller; None means every project (an unscoped admin)."""
    if principal.is_admin:
        return None if principal.key_projects is None else set(principal.key_projects)
    if principal.user_id is None:
        return set()
    mine = {str(pid) for pid in session.scalars(
        select(ProjectMember.project_id).where(ProjectMember.user_id == principal.user_id)
    )}
    return mine if principal.key_projects is None else mine & principal.key_projects


def project_for_new_object(session: Session, principal: Principal, project_id: int | None) -> str:
    """The project a new dataset or job goes to: the one named (the caller must be a member or above), else the
    caller's own default project."""
    from visionyard.api.auth.service import default_project
    from visionyard.api.db.models_access import Project

    missing = f"project_id: project {project_id} not found"
    if project_id is None:
        if principal.user_id is None:
            raise Forbidden("project_id: required for a credential that is not a user's")
        chosen = str(default_project(session, principal.user_id).id)
    else:
        if session.get(Project, project_id) is None:
            raise NotFound(missing)
        chosen = str(project_id)
    require_project_role(session, principal, chosen, Role.MEMBER, not_found=missing)
    return chosen
