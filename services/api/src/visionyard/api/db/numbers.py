"""Integer job ids: one shared sequence for training, export and inference jobs (see `JobNumber`)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from visionyard.api.db.models_access import JobNumber


def next_job_id(session: Session, kind: str) -> str:
    """The next job id, as the decimal string every table and event carries."""
    number = JobNumber(kind=kind)
    session.add(number)
    session.flush()
    return str(number.id)
