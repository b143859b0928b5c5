"""ORM models of dataset versions' split configuration and named snapshots (migration 0002_datasets)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from visionyard.api.db.models import Base, utcnow


class DatasetSplit(Base):
    """How one dataset version divides into train/val(/test): the request and its resolved assignment."""

    __tablename__ = "dataset_splits"
    __table_args__ = (UniqueConstraint("dataset_id", "content_hash", name="uq_dataset_splits_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(String(64), ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    content_hash: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(16))
    default_ratio: Mapped[list[Any]] = mapped_column(JSON, default=list)
    seed: Mapped[int] = mapped_column(Integer, default=42)
    # What the user pinned (manual/partial) and what every image ended up in (relative paths).
    requested: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    assignment: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DatasetSnapshot(Base):
    """A named dataset version: a tag (unique per dataset) for one content hash."""

    __tablename__ = "dataset_snapshots"
    __table_args__ = (UniqueConstraint("dataset_id", "version_tag", name="uq_dataset_snapshots_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(String(64), ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    content_hash: Mapped[str] = mapped_column(String(128))
    version_tag: Mapped[str] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
