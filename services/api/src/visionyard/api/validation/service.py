"""Validation views of a training job: per-epoch metrics with their checkpoints, one epoch's per-class
results, and one epoch's per-image results with each image.

Fed by what trainers report: `progress` metrics per epoch, and a `validation_result` log event whose data
holds the epoch's class names, confusion matrix and per-class precision/recall/F1, and (the built-in
classifier) each validation image's prediction (projected into rows by validation/projection.py). An
image is the one in the job's pinned dataset version, read through storage like the dataset gallery's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from visionyard.api.db.models import Checkpoint, TrainingJob, TrainingLog, TrainingMetric
from visionyard.api.db.models_deployments import ValidationImageResult
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, NotFound
from visionyard.api.validation.projection import IMAGE_RESULTS, VALIDATION_EVENT


@dataclass(frozen=True)
class ImageSource:
    """Where a validation image lives: a file of a stored dataset version."""

    dataset_id: str
    content_hash: str
    filename: str


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

    def images(self, job_id: str, epoch: int, *, true_label_id: int | None, predicted_label_id: int | None,
               correct: bool | None, skip: int, limit: int, base_url: str) -> dict[str, Any]:
        """A page of one epoch's per-image results (newest attempt that reported the epoch), filtered by a
        confusion-matrix cell or by correctness; 404 naming `epoch` when the trainer reported none."""
        with self._uow.read() as session:
            job = _job(session, job_id)
            attempt = session.scalar(select(func.max(ValidationImageResult.attempt)).where(
                ValidationImageResult.job_id == job.id, ValidationImageResult.epoch == epoch))
            report = self._validation_log(session, job.id, epoch, attempt)
            if attempt is None:
                if report is None:
                    raise NotFound(f"epoch: job {job_id} has no validation result for epoch {epoch}")
                raise NotFound(f"epoch: the trainer of job {job_id} reported no per-image results for epoch {epoch} "
                               "(only its confusion matrix and per-class metrics)")
            rows = select(ValidationImageResult).where(
                ValidationImageResult.job_id == job.id, ValidationImageResult.epoch == epoch,
                ValidationImageResult.attempt == attempt)
            if true_label_id is not None:
                rows = rows.where(ValidationImageResult.true_label_id == true_label_id)
            if predicted_label_id is not None:
                rows = rows.where(ValidationImageResult.predicted_label_id == predicted_label_id)
            if correct is not None:
                same = ValidationImageResult.true_label_id == ValidationImageResult.predicted_label_id
                rows = rows.where(same if correct else ~same)
            total = session.scalar(select(func.count()).select_from(rows.subquery())) or 0
            page = session.scalars(rows.order_by(ValidationImageResult.position).offset(skip).limit(limit)).all()
            data = report.data if report is not None and isinstance(report.data, dict) else {}
            names = list(data.get("class_names") or [])
            declared_counts = data.get(IMAGE_RESULTS)
            counts: dict[str, Any] = declared_counts if isinstance(declared_counts, dict) else {}
            reported = session.scalar(select(func.count()).select_from(ValidationImageResult).where(
                ValidationImageResult.job_id == job.id, ValidationImageResult.epoch == epoch,
                ValidationImageResult.attempt == attempt)) or 0
            declared_total = counts.get("total")
            validated = declared_total if isinstance(declared_total, int) else reported
            base = base_url.rstrip("/")

            def label(index: int) -> str:
                return names[index] if 0 <= index < len(names) else str(index)

            return {
                "job_id": _wire_id(job.id), "epoch": epoch, "attempt": attempt, "total_count": total, "skip": skip,
                "limit": limit, "class_names": names, "reported_images": reported, "validated_images": validated,
                "complete": reported >= validated,
                "images": [{
                    "id": row.id, "validation_result_id": report.id if report is not None else None,
                    "job_id": _wire_id(job.id), "epoch": epoch, "image_path": row.image_path,
                    "image_name": row.image_path.rsplit("/", 1)[-1], "image_index": row.position,
                    "true_label": label(row.true_label_id), "true_label_id": row.true_label_id,
                    "predicted_label": label(row.predicted_label_id), "predicted_label_id": row.predicted_label_id,
                    "confidence": row.confidence, "top5_predictions": None,
                    "is_correct": row.true_label_id == row.predicted_label_id,
                    "image_url": f"{base}/api/v1/validation/images/{row.id}",
                } for row in page],
            }

    def image_source(self, image_id: int) -> ImageSource:
        """The dataset file a validation image row names (the job's pinned version)."""
        with self._uow.read() as session:
            row = session.get(ValidationImageResult, image_id)
            if row is None:
                raise NotFound(f"image_id: validation image {image_id} not found")
            job = _job(session, row.job_id)
            if not job.dataset_snapshot_id:
                raise Conflict(f"image_id: training job {job.id} has no pinned dataset version")
            return ImageSource(dataset_id=job.dataset_id, content_hash=job.dataset_snapshot_id,
                               filename=row.image_path)

    @staticmethod
    def _validation_log(session: Session, job_id: str, epoch: int, attempt: int | None) -> TrainingLog | None:
        query = select(TrainingLog).where(TrainingLog.job_id == job_id, TrainingLog.event_type == VALIDATION_EVENT)
        if attempt is not None:
            query = query.where(TrainingLog.attempt == attempt)
        for row in session.scalars(query.order_by(TrainingLog.attempt.desc(), TrainingLog.seq.desc())):
            if isinstance(row.data, dict) and row.data.get("epoch") == epoch:
                return row
        return None


def _wire_id(job_id: str) -> int | str:
    return int(job_id) if job_id.isdigit() else job_id


def _job(session: Session, job_id: str) -> TrainingJob:
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
