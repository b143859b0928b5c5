"""The training job state machine: every legal transition, user-driven or event-driven, in one place."""

from __future__ import annotations

from enum import StrEnum

from visionyard.api.errors import Conflict


class JobStatus(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobAction(StrEnum):
    """What a user asks of a job."""

    START = "start"
    CANCEL = "cancel"
    RESTART = "restart"
    RESUME = "resume"


class JobOutcome(StrEnum):
    """What an event says happened to the current attempt."""

    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})

USER_TRANSITIONS: dict[tuple[JobStatus, JobAction], JobStatus] = {
    (JobStatus.PENDING, JobAction.START): JobStatus.QUEUED,
    (JobStatus.PENDING, JobAction.CANCEL): JobStatus.CANCELLED,
    # Nobody runs a queued job yet (or a runner is about to and will see the KV cancel first).
    (JobStatus.QUEUED, JobAction.CANCEL): JobStatus.CANCELLED,
    # A running job is only cancelled once its runner confirms the process is gone.
    (JobStatus.RUNNING, JobAction.CANCEL): JobStatus.CANCELLING,
    **{(status, JobAction.RESTART): JobStatus.QUEUED for status in TERMINAL},
    **{(status, JobAction.RESUME): JobStatus.QUEUED for status in TERMINAL},
}

# Event-driven transitions of the current attempt. Terminal states are absent as sources: they are
# sticky for their attempt, so a late `started` cannot revive a cancelled job.
EVENT_TRANSITIONS: dict[tuple[JobStatus, JobOutcome], JobStatus] = {
    (JobStatus.PENDING, JobOutcome.STARTED): JobStatus.RUNNING,
    (JobStatus.QUEUED, JobOutcome.STARTED): JobStatus.RUNNING,
    **{(status, JobOutcome.COMPLETED): JobStatus.COMPLETED for status in (JobStatus.QUEUED, *ACTIVE)},
    **{(status, JobOutcome.FAILED): JobStatus.FAILED for status in (JobStatus.PENDING, *ACTIVE)},
    **{(status, JobOutcome.CANCELLED): JobStatus.CANCELLED for status in (JobStatus.PENDING, *ACTIVE)},
}


def user_transition(job_id: str, current: str, action: JobAction) -> JobStatus:
    """The status `action` moves a job to; raises Conflict naming the current status."""
    target = USER_TRANSITIONS.get((JobStatus(current), action))
    if target is None:
        raise Conflict(f"cannot {action.value} job {job_id}: status is {current}")
    return target


def event_transition(current: str, outcome: JobOutcome) -> JobStatus | None:
    """The status an event of the current attempt moves a job to, or None to leave it as it is."""
    status = JobStatus(current)
    if status is JobStatus.RUNNING and outcome is JobOutcome.STARTED:
        return None
    if status is JobStatus.CANCELLING and outcome is JobOutcome.STARTED:
        return None
    return EVENT_TRANSITIONS.get((status, outcome))


def is_terminal(status: str) -> bool:
    """Whether the job's current attempt has ended."""
    return JobStatus(status) in TERMINAL
