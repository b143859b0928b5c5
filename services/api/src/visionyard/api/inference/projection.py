"""Projection of inference events onto the inference rows and their result rows, idempotently.

Events of an older attempt are ignored; a cancelled inference job stays cancelled.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.db.models_exports import InferenceJob, InferenceResult
from visionyard.api.exports.projection import fence_stale_run, move
from visionyard.api.jobstate import JobOutcome
from visionyard.shared.events import (
    ExportInferenceEvent,
    InferenceCancelled,
    InferenceCompleted,
    InferenceFailed,
    InferenceResultsStored,
    InferenceStarted,
)

log = logging.getLogger("visionyard.api.inference.projection")


def project_inference_event(session: Session, event: ExportInferenceEvent) -> None:
    """Project one inference event (an unknown id is logged and skipped: the row was deleted)."""
    inference = session.get(InferenceJob, event.job_id)
    if inference is None:
        log.info("event for an unknown inference job", extra={"job_id": event.job_id})
        return
    apply_inference_event(session, inference, event)


def apply_inference_event(session: Session, inference: InferenceJob, event: ExportInferenceEvent) -> None:
    """Move an inference job through pending → running → completed | failed, storing its rows."""
    if fence_stale_run(inference, event):
        return
    if isinstance(event, InferenceStarted):
        if move(inference, JobOutcome.STARTED):
            inference.started_at = inference.started_at or event.occurred_at
    elif isinstance(event, InferenceResultsStored):
        inference.results_uri = event.uri
    elif isinstance(event, InferenceCompleted):
        if jobstate.event_transition(inference.status, JobOutcome.COMPLETED) is None:
            return
        record_results(session, inference, event.results)
        move(inference, JobOutcome.COMPLETED)
        inference.started_at = inference.started_at or event.occurred_at
        inference.completed_at = event.occurred_at
    elif isinstance(event, InferenceFailed):
        if move(inference, JobOutcome.FAILED):
            inference.error_message = f"{event.reason.value}: {event.error_message}"
            inference.completed_at = event.occurred_at
    elif isinstance(event, InferenceCancelled):
        if move(inference, JobOutcome.CANCELLED):
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
