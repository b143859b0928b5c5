"""The job state machine: every legal transition, user-driven or event-driven, in one place.

Training, export and inference jobs share it. An export or inference job's command is sent when it is
created, so it waits for a runner as `pending` and never passes through `queued`, `retrying` or
`resuming`; apart from that it moves like a training job (pending → running → completed | failed,
cancel: pending → cancelled, running → cancelling → cancelled).
"""

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
    # A new attempt the platform queued itself after an infrastructure failure (resumes from a checkpoint).
    RETRYING = "retrying"
    # A new attempt a user asked for with `resume`, continuing from the last stored checkpoint.
    RESUMING = "resuming"


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
    # The attempt was lost to infrastructure and another attempt is allowed: the platform retries.
    RETRY = "retry"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
# Waiting for a runner: no trainer of the current attempt is known to run yet.
WAITING: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RESUMING})
ACTIVE: frozenset[JobStatus] = frozenset({*WAITING, JobStatus.RUNNING, JobStatus.CANCELLING})

USER_TRANSITIONS: dict[tuple[JobStatus, JobAction], JobStatus] = {
    (JobStatus.PENDING, JobAction.START): JobStatus.QUEUED,
    (JobStatus.PENDING, JobAction.CANCEL): JobStatus.CANCELLED,
    # Nobody runs a queued job yet (or a runner is about to and will see the KV cancel first).
    **{(status, JobAction.CANCEL): JobStatus.CANCELLED for status in WAITING},
    # A running job is only cancelled once its runner confirms the process is gone.
    (JobStatus.RUNNING, JobAction.CANCEL): JobStatus.CANCELLING,
    **{(status, JobAction.RESTART): JobStatus.QUEUED for status in TERMINAL},
    **{(status, JobAction.RESUME): JobStatus.RESUMING for status in TERMINAL},
}

# Event-driven transitions of the current attempt. Terminal states are absent as sources: they are
# sticky for their attempt, so a late `started` cannot revive a cancelled job.
EVENT_TRANSITIONS: dict[tuple[JobStatus, JobOutcome], JobStatus] = {
    (JobStatus.PENDING, JobOutcome.STARTED): JobStatus.RUNNING,
    **{(status, JobOutcome.STARTED): JobStatus.RUNNING for status in WAITING},
    # From `pending` too: an export or inference job whose `started` event never came still completes.
    **{(status, JobOutcome.COMPLETED): JobStatus.COMPLETED for status in (JobStatus.PENDING, *ACTIVE)},
    # A cancelling job is not retried: the user wanted it stopped, and it is.
    **{(status, JobOutcome.RETRY): JobStatus.RETRYING for status in (*WAITING, JobStatus.RUNNING)},
    (JobStatus.CANCELLING, JobOutcome.RETRY): JobStatus.CANCELLED,
    **{(status, JobOutcome.FAILED): JobStatus.FAILED for status in (JobStatus.PENDING, *ACTIVE)},
    **{(status, JobOutcome.CANCELLED): JobStatus.CANCELLED for status in (JobStatus.PENDING, *ACTIVE)},
}


def user_target(current: str, action: JobAction) -> JobStatus | None:
    """The status `action` moves a job to, or None when the job's status does not allow it."""
    return USER_TRANSITIONS.get((JobStatus(current), action))


def user_transition(job_id: str, current: str, action: JobAction) -> JobStatus:
    """The status `action` moves a job to; raises Conflict naming the current status."""
    target = user_target(current, action)
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


def may_take_over(current: str) -> bool:
    """Whether a newer attempt the API did not issue (a runner failover) may take the job over.

    Only while the job is unfinished: a finished job is reopened only by the API itself (restart,
    resume, automatic retry), never by a late event or a redelivered command of a finished job.
    """
    return not is_terminal(current)


def rerun_transition(current: str) -> JobStatus | None:
    """The status of an export or inference job whose command ran again under a newer attempt, or None to keep it.

    Their commands are redelivered to another runner when the first one stopped renewing them: a job
    marked failed by the first runner is running again; a completed or cancelled one stays as it is.
    """
    return JobStatus.RUNNING if JobStatus(current) is JobStatus.FAILED else None
