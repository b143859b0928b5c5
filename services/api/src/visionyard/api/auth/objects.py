"""Access to one object by its id: load its project and check the caller's role there, in one read.

Another project's object answers exactly as a missing one ("not found"), so ids cannot be probed.
"""

from __future__ import annotations

from typing import Any

from visionyard.api.auth.access import Role, require_project_role
from visionyard.api.auth.principal import Principal
from visionyard.api.db.models import Dataset, TrainingJob
from visionyard.api.db.models_deployments import Deployment, ValidationImageResult
from visionyard.api.db.models_exports import ExportJob, InferenceJob
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import NotFound

_KINDS: dict[str, tuple[Any, str]] = {
    "training": (TrainingJob, "training job"),
    "export": (ExportJob, "export job"),
    "inference": (InferenceJob, "inference job"),
    "dataset": (Dataset, "dataset"),
    "deployment": (Deployment, "deployment"),
}
# Objects that carry no project of their own: the object whose project they share, by their row.
_OWNED: dict[str, tuple[Any, str, str]] = {
    "validation_image": (ValidationImageResult, "validation image", "job_id"),
}


class ObjectAccess:
    """Checks a caller's role on datasets and jobs by id."""

    def __init__(self, *, uow: UnitOfWork) -> None:
        self._uow = uow

    def require(self, principal: Principal, kind: str, object_id: int | str, need: Role, *, field: str) -> str:
        """The object's project id when the caller's role there is at least `need`; NotFound naming `field` else."""
        if kind in _OWNED:
            model, label, owner = _OWNED[kind]
        else:
            (model, label), owner = _KINDS[kind], ""
        missing = f"{field}: {label} {object_id} not found"
        with self._uow.read() as session:
            # Integer keys (deployments, validation images) are looked up as integers, the others as strings.
            key: int | str = int(object_id) if model.id.type.python_type is int else str(object_id)
            row = session.get(model, key)
            if row is not None and owner:
                row = session.get(TrainingJob, getattr(row, owner))
            if row is None:
                raise NotFound(missing)
            require_project_role(session, principal, row.project_id, need, not_found=missing)
            return str(row.project_id)


async def require_object(
    request: Any, principal: Principal, kind: str, object_id: int | str, need: Role, *, field: str
) -> str:
    """`ObjectAccess.require` for a route: the app's access checker, off the event loop."""
    from starlette.concurrency import run_in_threadpool

    access: ObjectAccess = request.app.state.access
    return await run_in_threadpool(access.require, principal, kind, object_id, need, field=field)
