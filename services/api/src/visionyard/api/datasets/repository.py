"""The datasets' repository: datasets and their immutable versions. It never commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from visionyard.api.db.inserts import insert_ignoring_duplicate
from visionyard.api.db.models import Dataset, DatasetVersion, utcnow


class DatasetRepository:
    """Datasets and their immutable versions."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, dataset: Dataset) -> None:
        """Stage a new dataset."""
        self.session.add(dataset)

    def get(self, dataset_id: str) -> Dataset | None:
        """One dataset."""
        return self.session.get(Dataset, dataset_id)

    def list(self) -> Sequence[Dataset]:
        """Every dataset, newest first."""
        return self.session.scalars(select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id)).all()

    def delete(self, dataset: Dataset) -> None:
        """Remove a dataset and its versions."""
        self.session.execute(delete(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id))
        self.session.delete(dataset)

    def versions(self, dataset_id: str) -> Sequence[DatasetVersion]:
        """A dataset's versions, oldest first."""
        return self.session.scalars(
            select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id).order_by(DatasetVersion.id)
        ).all()

    def add_version_once(self, *, dataset_id: str, content_hash: str, stats: dict[str, Any]) -> bool:
        """Record a version unless it exists (versions are immutable); whether it was new."""
        return insert_ignoring_duplicate(
            self.session,
            DatasetVersion,
            {"dataset_id": dataset_id, "content_hash": content_hash, "stats": stats, "created_at": utcnow()},
            ("dataset_id", "content_hash"),
        )
