"""Projection of export and inference events onto their rows, idempotently.

An export is `completed` only when the exporter succeeded AND storage holds its package (either
event may come first). Every export status change is also announced on its training job's feed
(`evt.job.<training_job_id>.export_status`, through the outbox), which is how WebSocket clients
subscribed to the training job receive `export_status_change`. Events of an older attempt are ignored.
A cancelled job stays cancelled: a runner that finished before the cancel reached it changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from visionyard.api.db.models import TrainingJob, utcnow
from visionyard.api.db.models_exports import ExportJob, InferenceJob, InferenceResult
from visionyard.api.db.repositories import OutboxRepository
from visionyard.shared.events import (
    ExportCancelled,
    ExportCompleted,
    ExportFailed,
    ExportPackageStored,
    ExportStarted,
    ExportStatusChanged,
    InferenceCancelled,
    InferenceCompleted,
    InferenceFailed,
    InferenceResultsStored,
    InferenceStarted,
    ShipEvent,
)

log = logging.getLogger("visionyard.api.ship_projector")

TERMINAL = ("completed", "failed", "cancelled")


def apply_ship_event(session: Session, event: ShipEvent) -> None:
    """Project one export/inference event (unknown ids are logged and skipped: the row was deleted)."""
    if event.family == "export":
        export = session.get(ExportJob, event.job_id)
        if export is None:
            log.info("event for an unknown export", extra={"job_id": event.job_id})
            return
        apply_export_event(session, export, event)
    else:
        inference = session.get(InferenceJob, event.job_id)
        if inference is None:
            log.info("event for an unknown inference job", extra={"job_id": event.job_id})
            return
        apply_inference_event(session, inference, event)


def _fenced(row: ExportJob | InferenceJob, event: ShipEvent) -> bool:
    if event.attempt < row.attempt:
        return True
    if event.attempt > row.attempt:
        row.attempt = event.attempt  # a redelivered command ran again elsewhere: follow the newer attempt
        if row.status == "failed":
            row.status, row.error_message = "running", None
    return False


def apply_export_event(session: Session, export: ExportJob, event: ShipEvent) -> None:
    """Move an export through pending → running → completed | failed."""
    if _fenced(export, event):
        return
    old = export.status
    if isinstance(event, ExportStarted):
        if export.status == "pending":
            export.status = "running"
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
        if export.status not in TERMINAL:
            export.status = "failed"
            export.error_message = f"{event.reason.value}: {event.error_message}"
            export.completed_at = event.occurred_at
    elif isinstance(event, ExportCancelled):
        if export.status not in TERMINAL:
            export.status = "cancelled"
            export.completed_at = event.occurred_at
    if export.exporter_done and export.export_path and export.status not in TERMINAL:
        export.status = "completed"
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


def apply_inference_event(session: Session, inference: InferenceJob, event: ShipEvent) -> None:
    """Move an inference job through pending → running → completed | failed, storing its rows."""
    if _fenced(inference, event):
        return
    if isinstance(event, InferenceStarted):
        if inference.status == "pending":
            inference.status = "running"
            inference.started_at = inference.started_at or event.occurred_at
    elif isinstance(event, InferenceResultsStored):
        inference.results_uri = event.uri
    elif isinstance(event, InferenceCompleted):
        if inference.status in TERMINAL:
            return
        record_results(session, inference, event.results)
        inference.status = "completed"
        inference.started_at = inference.started_at or event.occurred_at
        inference.completed_at = event.occurred_at
    elif isinstance(event, InferenceFailed):
        if inference.status not in TERMINAL:
            inference.status = "failed"
            inference.error_message = f"{event.reason.value}: {event.error_message}"
            inference.completed_at = event.occurred_at
    elif isinstance(event, InferenceCancelled):
        if inference.status not in TERMINAL:
            inference.status = "cancelled"
            inference.completed_at = event.occurred_at


def record_results(session: Session, inference: InferenceJob, results: dict[str, Any]) -> None:
    """Replace the job's result rows with those the handler loaded from the staged results file."""
    rows: list[dict[str, Any]] = list(results.get("rows") or [])
    summary = {key: value for key, value in results.items() if key != "rows"}
    session.execute(delete(InferenceResult).where(InferenceResult.inference_job_id == inference.id))
    for position, row in enumerate(rows):
        session.add(InferenceResult(
            inference_job_id=inference.id, position=position, image_name=str(row.get("image_name", "")),
            predicted_label=row.get("predicted_label"), predicted_label_id=row.get("predicted_label_id"),
            confidence=row.get("confidence"), top5_predictions=list(row.get("top5_predictions") or []),
            predicted_boxes=row.get("predicted_boxes"), inference_time_ms=row.get("inference_time_ms"),
            true_label=row.get("true_label"), error=row.get("error"),
        ))
    inference.summary = summary
    inference.total_images = int(summary.get("total_images", len(rows)))
    inference.total_inference_time_ms = summary.get("total_inference_time_ms")
    inference.avg_inference_time_ms = summary.get("avg_inference_time_ms")
