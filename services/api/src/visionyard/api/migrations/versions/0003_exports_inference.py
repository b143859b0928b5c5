"""export and inference jobs

Revision ID: 0003_exports_inference
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_exports_inference'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        'export_jobs',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('project_id', sa.String(128), nullable=False),
        sa.Column('training_job_id', sa.String(64), sa.ForeignKey('training_jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('export_format', sa.String(32), nullable=False),
        sa.Column('checkpoint_kind', sa.String(32), nullable=False),
        sa.Column('checkpoint_path', sa.Text(), nullable=True),
        sa.Column('export_config', sa.JSON(), nullable=False),
        sa.Column('validation_config', sa.JSON(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('is_default', sa.Boolean(), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('export_results', sa.JSON(), nullable=True),
        sa.Column('export_path', sa.Text(), nullable=True),
        sa.Column('package_sha256', sa.String(64), nullable=True),
        sa.Column('file_size_bytes', sa.BigInteger(), nullable=True),
        sa.Column('validation_passed', sa.Boolean(), nullable=True),
        sa.Column('exporter_done', sa.Boolean(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint('training_job_id', 'version', name='uq_export_jobs_version'),
    )
    op.create_index('ix_export_jobs_training_job_id', 'export_jobs', ['training_job_id'])
    op.create_table(
        'inference_jobs',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('project_id', sa.String(128), nullable=False),
        sa.Column('training_job_id', sa.String(64), sa.ForeignKey('training_jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('checkpoint_kind', sa.String(32), nullable=False),
        sa.Column('checkpoint_path', sa.Text(), nullable=True),
        sa.Column('inference_type', sa.String(16), nullable=False),
        sa.Column('input_data', sa.JSON(), nullable=False),
        sa.Column('task_type', sa.String(64), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('total_images', sa.Integer(), nullable=True),
        sa.Column('total_inference_time_ms', sa.Float(), nullable=True),
        sa.Column('avg_inference_time_ms', sa.Float(), nullable=True),
        sa.Column('summary', sa.JSON(), nullable=True),
        sa.Column('results_uri', sa.Text(), nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index('ix_inference_jobs_training_job_id', 'inference_jobs', ['training_job_id'])
    op.create_table(
        'inference_results',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('inference_job_id', sa.String(64), sa.ForeignKey('inference_jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('image_name', sa.Text(), nullable=False),
        sa.Column('predicted_label', sa.String(256), nullable=True),
        sa.Column('predicted_label_id', sa.Integer(), nullable=True),
        sa.Column('confidence', sa.Float(), nullable=True),
        sa.Column('top5_predictions', sa.JSON(), nullable=False),
        sa.Column('predicted_boxes', sa.JSON(), nullable=True),
        sa.Column('inference_time_ms', sa.Float(), nullable=True),
        sa.Column('true_label', sa.String(256), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.UniqueConstraint('inference_job_id', 'position', name='uq_inference_results_position'),
    )
    op.create_index('ix_inference_results_inference_job_id', 'inference_results', ['inference_job_id'])
    op.create_table(
        'inference_uploads',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('session_id', sa.String(64), nullable=False),
        sa.Column('training_job_id', sa.String(64), nullable=True),
        sa.Column('original_filename', sa.Text(), nullable=False),
        sa.Column('unique_filename', sa.Text(), nullable=False),
        sa.Column('uri', sa.Text(), nullable=False, unique=True),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_inference_uploads_session_id', 'inference_uploads', ['session_id'])


def downgrade() -> None:
    """Revert this revision."""
    for table in ('inference_uploads', 'inference_results', 'inference_jobs', 'export_jobs'):
        op.drop_table(table)
