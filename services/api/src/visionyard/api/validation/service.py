"""Validation views of a training job: per-epoch metrics with their checkpoints, and one epoch's per-class results.

Fed by what trainers report: `progress` metrics per epoch, and a `validation_result` log event whose data
holds the epoch's class names, confusion matrix and per-class precision/recall/F1.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from visionyard.api.db.models import Checkpoint, TrainingJob, TrainingLog, TrainingMetric
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import NotFound

VALIDATION_EVENT = "validation_result"


class ValidationService:
    """Reads over the job's projected metrics, checkpoints and validation events."""

    def __init__(self, *, uow: UnitOfWork) -> None:
        self._uow = uow

    def summary(self, job_id: str) -> dict[str, Any]:
        """Every epoch of the current attempt (its last report each), its checkpoint if one is kept, the best epoch."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            rows = session.scalars(
                select(TrainingMetric).where(TrainingMetric.job_id == job.id, TrainingMetric.attempt == job.attempt)
                .order_by(TrainingMetric.seq)
            ).all()
            kept = {row.epoch: row.uri for row in session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.status == "stored")
            ) if row.epoch is not None}
            has_results = {row.data.get("epoch") for row in session.scalars(
                select(TrainingLog).where(TrainingLog.job_id == job.id, TrainingLog.event_type == VALIDATION_EVENT)
            ) if isinstance(row.data, dict)}
            by_epoch: dict[int, TrainingMetric] = {}
            for row in rows:
                by_epoch[row.epoch] = row
            epochs = []
            for epoch in sorted(by_epoch):
                row = by_epoch[epoch]
                metrics = {**(row.extra_metrics or {})}
                for name in ("loss", "accuracy", "learning_rate"):
                    if getattr(row, name) is not None:
                        metrics[name] = getattr(row, name)
                epochs.append({
                    "epoch": epoch, "loss": row.loss, "accuracy": row.accuracy, "metrics": metrics,
                    "checkpoint_path": kept.get(epoch) or row.checkpoint_path, "has_results": epoch in has_results,
                    "created_at": row.created_at,
                })
            best = _best(epochs, job.primary_metric, job.primary_metric_mode)
            return {
                "job_id": int(job.id) if job.id.isdigit() else job.id, "task_type": job.task_type,
                "primary_metric": job.primary_metric, "primary_metric_mode": job.primary_metric_mode,
                "total_epochs": len(epochs), "epoch_metrics": epochs,
                "best_epoch": best["epoch"] if best else None, "best_metric_name": job.primary_metric,
                "best_metric_value": best["metrics"].get(job.primary_metric) if best else None,
                "best_checkpoint_path": job.best_checkpoint_path, "last_checkpoint_path": job.last_checkpoint_path,
            }

    def results(self, job_id: str, epoch: int) -> dict[str, Any]:
        """One epoch's per-class metrics and confusion matrix (classification), as the trainer reported them."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            rows = session.scalars(
                select(TrainingLog).where(TrainingLog.job_id == job.id, TrainingLog.event_type == VALIDATION_EVENT)
                .order_by(TrainingLog.attempt.desc(), TrainingLog.seq.desc())
            )
            for row in rows:
                if isinstance(row.data, dict) and row.data.get("epoch") == epoch:
                    metric = session.scalars(
                        select(TrainingMetric).where(TrainingMetric.job_id == job.id,
                                                     TrainingMetric.attempt == row.attempt,
                                                     TrainingMetric.epoch == epoch)
                        .order_by(TrainingMetric.seq.desc())
                    ).first()
                    return {
                        "job_id": int(job.id) if job.id.isdigit() else job.id, "epoch": epoch,
                        "attempt": row.attempt, "task_type": row.data.get("task_type", job.task_type),
                        "overall_metrics": {"loss": metric.loss, "accuracy": metric.accuracy,
                                            **(metric.extra_metrics or {})} if metric else {},
                        "class_names": row.data.get("class_names", []),
                        "confusion_matrix": row.data.get("confusion_matrix"),
                        "per_class_metrics": row.data.get("per_class_metrics", []),
                    }
            raise NotFound(f"epoch: job {job_id} has no validation result for epoch {epoch}")


def _job(session: Any, job_id: str) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFound(f"job_id: training job {job_id} not found")
    return job


def _best(epochs: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [entry for entry in epochs if isinstance(entry["metrics"].get(metric), (int, float))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda entry: entry["metrics"][metric])
