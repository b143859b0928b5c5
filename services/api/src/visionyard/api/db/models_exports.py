"""ORM models of export and inference jobs (tables created by migration 0003_exports_inference)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from visionyard.api.db.models import Base, utcnow


class ExportJob(Base):
    """One export of a training job's checkpoint; versions count up per training job."""

    __tablename__ = "export_jobs"
    __table_args__ = (UniqueConstraint("training_job_id", "version", name="uq_export_jobs_version"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128), default="default")
    training_job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("training_jobs.id", ondelete="CASCADE"), index=True
    )
    export_format: Mapped[str] = mapped_column(String(32))
    checkpoint_kind: Mapped[str] = mapped_column(String(32))
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The exported checkpoint's bytes (migration 0005): a deployment serves only that checkpoint.
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    export_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    validation_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    version: Mapped[int] = mapped_column(Integer)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    export_results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    export_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    package_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    file_size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    validation_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    exporter_done: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class InferenceJob(Base):
    """One inference run of a training job's checkpoint over uploaded images or a dataset split."""

    __tablename__ = "inference_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(128), default="default")
    training_job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("training_jobs.id", ondelete="CASCADE"), index=True
    )
    checkpoint_kind: Mapped[str] = mapped_column(String(32))
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    inference_type: Mapped[str] = mapped_column(String(16))
    input_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    task_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    total_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_inference_time_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    avg_inference_time_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    results_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class InferenceResult(Base):
    """One image's prediction in an inference job."""

    __tablename__ = "inference_results"
    __table_args__ = (UniqueConstraint("inference_job_id", "position", name="uq_inference_results_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inference_job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("inference_jobs.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    image_name: Mapped[str] = mapped_column(Text)
    predicted_label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    predicted_label_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    top5_predictions: Mapped[list[Any]] = mapped_column(JSON, default=list)
    predicted_boxes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    inference_time_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    true_label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class InferenceUpload(Base):
    """An image uploaded for inference and kept by storage; jobs may only name these."""

    __tablename__ = "inference_uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    training_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    original_filename: Mapped[str] = mapped_column(Text)
    unique_filename: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text, unique=True)
    key: Mapped[str] = mapped_column(Text)
    # The user who uploaded it (migration 0005): only they (or an admin) may delete their session's images.
    uploaded_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Registers the deployment and per-image validation tables (migration 0005_frontend_calls), which refer to these.
from visionyard.api.db import models_deployments as _models_deployments  # noqa: E402,F401
