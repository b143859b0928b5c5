"""ORM models of deployments and of per-image validation results (tables created by migration 0005_frontend_calls)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from visionyard.api.db.models import Base, utcnow


class Deployment(Base):
    """A completed export made available: an inference endpoint (with its own key) or a package link.

    The endpoint serves the stored checkpoint the export was made from, pinned by its sha256: a retrained
    job (a different checkpoint under the same kind) no longer matches, and the endpoint says so.
    The key itself is not stored: it is re-derived from the API's secret and `key_salt` (see deployments/keys.py).
    """

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(128))
    export_job_id: Mapped[str] = mapped_column(String(64), ForeignKey("export_jobs.id"), index=True)
    training_job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("training_jobs.id", ondelete="CASCADE"), index=True
    )
    deployment_type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="inactive")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    key_salt: Mapped[str | None] = mapped_column(String(64), nullable=True)
    checkpoint_kind: Mapped[str] = mapped_column(String(32))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    total_inference_time_ms: Mapped[float] = mapped_column(Float, default=0.0)
    total_latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    last_request_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    deactivated_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ValidationImageResult(Base):
    """One validation image's prediction in one epoch of one attempt, as the trainer reported it."""

    __tablename__ = "validation_image_results"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "epoch", "position", name="uq_validation_image_results_position"),
        Index("ix_validation_image_results_job_epoch", "job_id", "epoch"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("training_jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    true_label_id: Mapped[int] = mapped_column(Integer)
    predicted_label_id: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
