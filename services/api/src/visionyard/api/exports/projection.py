"""Projection of export events onto the export rows, idempotently.

An export is `completed` only when the exporter succeeded AND storage holds its package (either
event may come first). Every export status change is also announced on its training job's feed
(`evt.job.<training_job_id>.export_status`, through the outbox), which is how WebSocket clients
subscribed to the training job receive `export_status_change`. Events of an older attempt are ignored.
A cancelled export stays cancelled: a runner that finished before the cancel reached it changes nothing.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.db.models import TrainingJob, utcnow
from visionyard.api.db.models_exports import ExportJob, InferenceJob
from visionyard.api.jobstate import JobOutcome
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.shared.events import (
    ExportCancelled,
    ExportCompleted,
    ExportFailed,
    ExportInferenceEvent,
    ExportPackageStored,
    ExportStarted,
    ExportStatusChanged,
)

log = logging.getLogger("visionyard.api.exports.projection")

def project_export_event(session: Session, event: ExportInferenceEvent) -> None:
    """Project one export event (an unknown id is logged and skipped: the row was deleted)."""
    export = session.get(ExportJob, event.job_id)
    if export is None:
        log.info("event for an unknown export", extra={"job_id": event.job_id})
        return
    apply_export_event(session, export, event)


def fence_stale_run(row: ExportJob | InferenceJob, event: ExportInferenceEvent) -> bool:
    """Whether to ignore an export or inference event of an older attempt; a newer one is followed."""
    if event.attempt < row.attempt:
        return True
    if event.attempt > row.attempt:
        row.attempt = event.attempt  # a redelivered command ran again elsewhere: follow the newer attempt
        rerun = jobstate.rerun_transition(row.status)
        if rerun is not None:
            row.status, row.error_message = rerun.value, None
    return False


def move(row: ExportJob | InferenceJob, outcome: JobOutcome) -> bool:
    """Move an export or inference job as an event of its current attempt says; whether it moved."""
    target = jobstate.event_transition(row.status, outcome)
    if target is None:
        return False
    row.status = target.value
    return True


def apply_export_event(session: Session, export: ExportJob, event: ExportInferenceEvent) -> None:
    """Move an export through pending → running → completed | failed."""
    if fence_stale_run(export, event):
        return
    old = export.status
    if isinstance(event, ExportStarted):
        if move(export, JobOutcome.STARTED):
            export.started_at = export.started_at or event.occurred_at
    elif isinstance(event, ExportPackageStored):
        export.export_path = event.uri
        export.package_sha256 = event.sha256
        export.file_size_bytes = event.size_bytes
    elif isinstance(event, ExportCompleted):
        export.exporter_done = True
        export.export_results = dict(event.results)
        passed = event.results.get("validation_passed")
        export.validation_passed = None if passed is None else bool(passed)
        export.started_at = export.started_at or event.occurred_at
    elif isinstance(event, ExportFailed):
        if move(export, JobOutcome.FAILED):
            export.error_message = f"{event.reason.value}: {event.error_message}"
            export.completed_at = event.occurred_at
    elif isinstance(event, ExportCancelled):
        if move(export, JobOutcome.CANCELLED):
            export.completed_at = event.occurred_at
    if export.exporter_done and export.export_path and move(export, JobOutcome.COMPLETED):
        export.completed_at = utcnow()
    if export.status != old:
        announce_export_status(session, export, old=old)


def announce_export_status(session: Session, export: ExportJob, *, old: str) -> None:
    """Queue `export_status` on the training job's feed (deterministic id: announced once)."""
    training = session.get(TrainingJob, export.training_job_id)
    OutboxRepository(session).add(
        ExportStatusChanged(
            message_id=f"export-status-{export.id}-{export.attempt}-{export.status}",
            job_id=export.training_job_id,
            attempt=training.attempt if training is not None else 1,
            export_job_id=export.id,
            old_status=old,
            new_status=export.status,
        )
    )
