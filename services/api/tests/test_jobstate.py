"""The job state machine: legal moves succeed, illegal ones name the current status."""

from __future__ import annotations

import pytest

from visionyard.api.errors import Conflict
from visionyard.api.jobstate import (
    JobAction,
    JobOutcome,
    JobStatus,
    event_transition,
    rerun_transition,
    user_target,
    user_transition,
)


@pytest.mark.parametrize(
    ("current", "action", "expected"),
    [
        ("pending", JobAction.START, JobStatus.QUEUED),
        ("pending", JobAction.CANCEL, JobStatus.CANCELLED),
        ("queued", JobAction.CANCEL, JobStatus.CANCELLED),
        ("running", JobAction.CANCEL, JobStatus.CANCELLING),
        ("completed", JobAction.RESTART, JobStatus.QUEUED),
        ("failed", JobAction.RESUME, JobStatus.RESUMING),
        ("cancelled", JobAction.RESTART, JobStatus.QUEUED),
    ],
)
def test_legal_user_transitions(current: str, action: JobAction, expected: JobStatus) -> None:
    assert user_transition("j1", current, action) is expected


@pytest.mark.parametrize(
    ("current", "action"),
    [
        ("running", JobAction.START),
        ("queued", JobAction.START),
        ("completed", JobAction.CANCEL),
        ("cancelling", JobAction.CANCEL),
        ("running", JobAction.RESTART),
        ("pending", JobAction.RESUME),
    ],
)
def test_illegal_user_transitions_name_the_current_status(current: str, action: JobAction) -> None:
    with pytest.raises(Conflict) as raised:
        user_transition("j1", current, action)
    assert str(raised.value) == f"cannot {action.value} job j1: status is {current}"


def test_terminal_states_are_sticky_against_late_events() -> None:
    assert event_transition("cancelled", JobOutcome.STARTED) is None
    assert event_transition("completed", JobOutcome.FAILED) is None
    assert event_transition("failed", JobOutcome.COMPLETED) is None
    assert event_transition("queued", JobOutcome.STARTED) is JobStatus.RUNNING
    assert event_transition("cancelling", JobOutcome.CANCELLED) is JobStatus.CANCELLED
    assert event_transition("cancelling", JobOutcome.STARTED) is None


def test_export_and_inference_jobs_move_on_the_same_machine() -> None:
    # Their command is sent at creation, so they wait as `pending`; a cancel there ends them at once.
    assert user_target("pending", JobAction.CANCEL) is JobStatus.CANCELLED
    assert user_target("running", JobAction.CANCEL) is JobStatus.CANCELLING
    assert user_target("cancelling", JobAction.CANCEL) is None
    assert event_transition("pending", JobOutcome.STARTED) is JobStatus.RUNNING
    assert event_transition("pending", JobOutcome.COMPLETED) is JobStatus.COMPLETED
    assert event_transition("cancelling", JobOutcome.COMPLETED) is JobStatus.COMPLETED
    assert event_transition("cancelled", JobOutcome.COMPLETED) is None
    # A redelivered command that ran again reopens only a failed job.
    assert rerun_transition("failed") is JobStatus.RUNNING
    assert rerun_transition("completed") is None
    assert rerun_transition("cancelled") is None
