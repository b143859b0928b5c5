"""Projection of storage's verdicts on dataset uploads onto the dataset rows, idempotently."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from visionyard.api.datasets.repository import DatasetRepository
from visionyard.shared.events import DatasetEvent, DatasetReady, DatasetRejected

log = logging.getLogger("visionyard.api.datasets.projection")


def apply_dataset_event(session: Session, event: DatasetEvent) -> None:
    """Project a storage verdict on an upload onto the dataset row."""
    datasets = DatasetRepository(session)
    dataset = datasets.get(event.dataset_id)
    if dataset is None:
        log.info("dataset event for a deleted or unknown dataset", extra={"dataset_id": event.dataset_id})
        return
    if isinstance(event, DatasetReady):
        stats = event.model_dump(mode="json", exclude={"message_id", "occurred_at", "schema_version", "dataset_id"})
        datasets.add_version_once(dataset_id=dataset.id, content_hash=event.content_hash, stats=stats)
        dataset.status = "ready"
        dataset.content_hash = event.content_hash
        dataset.format = event.format
        dataset.num_images = event.num_images
        dataset.num_classes = event.num_classes
        dataset.class_names = list(event.class_names)
        dataset.class_counts = dict(event.class_counts)
        dataset.splits = dict(event.splits)
        dataset.task_types = list(event.task_types)
        dataset.size_bytes = event.size_bytes
        dataset.uri = event.uri
        dataset.labeled = event.num_classes > 0
        dataset.rejection_reason = None
    elif isinstance(event, DatasetRejected):
        dataset.rejection_reason = event.reason
        # A rejected re-upload leaves the current version usable.
        dataset.status = "ready" if dataset.content_hash else "rejected"
