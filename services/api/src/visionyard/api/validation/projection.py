"""Projection of a trainer's per-image validation results: the `image_results` of a `validation_result`
log event become one `validation_image_results` row per image; the log row keeps only their counts.

A trainer reports them compactly, as aligned arrays (the image's path inside the dataset version, its true
and predicted class ids, the predicted class's confidence), plus how many images it validated in all:

    {"image_results": {"total": 360, "images": ["3/a.png", ...], "true": [3, ...], "predicted": [3, ...],
                       "confidence": [0.98, ...]}}

A trainer may report fewer images than it validated (the classifier caps an epoch's report and puts the
misclassified first); `total` says so and the views show it. A malformed report keeps the log line and
stores no image rows (the reason is kept in the log's data), so a trainer's mistake loses no log.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from visionyard.api.db.models_deployments import ValidationImageResult

log = logging.getLogger("visionyard.api.validation")

VALIDATION_EVENT = "validation_result"
IMAGE_RESULTS = "image_results"
MAX_IMAGES_PER_EPOCH = 20_000


def split_image_results(data: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(the log's data without the per-image arrays, the image rows) of a validation event's data.

    The rows are None when the event carries no per-image results (or a malformed report).
    """
    if not isinstance(data, dict) or IMAGE_RESULTS not in data:
        return data, None
    report = data[IMAGE_RESULTS]
    kept = {key: value for key, value in data.items() if key != IMAGE_RESULTS}
    try:
        rows = _rows(report)
    except ValueError as error:
        log.warning("malformed per-image validation results: %s", error)
        kept[IMAGE_RESULTS] = {"error": str(error)}
        return kept, None
    total = report.get("total")
    kept[IMAGE_RESULTS] = {"reported": len(rows), "total": total if isinstance(total, int) else len(rows)}
    return kept, rows


def _rows(report: Any) -> list[dict[str, Any]]:
    if not isinstance(report, dict):
        raise ValueError("image_results must be an object of aligned arrays")
    columns: list[list[Any]] = []
    for name in ("images", "true", "predicted", "confidence"):
        column = report.get(name)
        if not isinstance(column, list):
            raise ValueError("image_results needs the arrays images, true, predicted and confidence")
        columns.append(column)
    images, true, predicted, confidence = columns
    if not len(images) == len(true) == len(predicted) == len(confidence):
        raise ValueError("image_results' arrays differ in length")
    if len(images) > MAX_IMAGES_PER_EPOCH:
        raise ValueError(f"image_results lists {len(images)} images; at most {MAX_IMAGES_PER_EPOCH} are kept per epoch")
    rows = []
    columns_by_image = zip(images, true, predicted, confidence, strict=True)
    for position, (path, true_id, predicted_id, score) in enumerate(columns_by_image):
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"images[{position}] is not a path inside the dataset: {path!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (true_id, predicted_id)):
            raise ValueError(f"true/predicted[{position}] are not class ids")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ValueError(f"confidence[{position}] is not a number")
        rows.append({"position": position, "image_path": path, "true_label_id": true_id,
                     "predicted_label_id": predicted_id, "confidence": float(score)})
    return rows


def record_validation_images(session: Session, *, job_id: str, attempt: int, epoch: int,
                             rows: list[dict[str, Any]]) -> None:
    """Replace the per-image rows of (job, attempt, epoch) with `rows` (called once per new log row)."""
    session.execute(delete(ValidationImageResult).where(
        ValidationImageResult.job_id == job_id, ValidationImageResult.attempt == attempt,
        ValidationImageResult.epoch == epoch,
    ))
    if rows:
        session.execute(insert(ValidationImageResult),
                        [{"job_id": job_id, "attempt": attempt, "epoch": epoch, **row} for row in rows])
