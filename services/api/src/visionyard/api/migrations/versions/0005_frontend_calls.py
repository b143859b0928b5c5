"""deployments, per-image validation results, who uploaded an inference image, what an export was made from

Revision ID: 0005_frontend_calls
Revises: 0004_access
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_frontend_calls'
down_revision = '0004_access'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        'deployments',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('project_id', sa.String(128), nullable=False),
        sa.Column('export_job_id', sa.String(64), sa.ForeignKey('export_jobs.id'), nullable=False),
        sa.Column('training_job_id', sa.String(64), sa.ForeignKey('training_jobs.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('deployment_type', sa.String(32), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('key_salt', sa.String(64), nullable=True),
        sa.Column('checkpoint_kind', sa.String(32), nullable=False),
        sa.Column('checkpoint_sha256', sa.String(64), nullable=True),
        sa.Column('request_count', sa.Integer(), nullable=False),
        sa.Column('total_inference_time_ms', sa.Float(), nullable=False),
        sa.Column('total_latency_ms', sa.Float(), nullable=False),
        sa.Column('last_request_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('error_message', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('deactivated_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index('ix_deployments_export_job_id', 'deployments', ['export_job_id'])
    op.create_index('ix_deployments_training_job_id', 'deployments', ['training_job_id'])
    op.create_table(
        'validation_image_results',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('job_id', sa.String(64), sa.ForeignKey('training_jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('epoch', sa.Integer(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('image_path', sa.Text(), nullable=False),
        sa.Column('true_label_id', sa.Integer(), nullable=False),
        sa.Column('predicted_label_id', sa.Integer(), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=False),
        sa.UniqueConstraint('job_id', 'attempt', 'epoch', 'position', name='uq_validation_image_results_position'),
    )
    op.create_index('ix_validation_image_results_job_epoch', 'validation_image_results', ['job_id', 'epoch'])
    op.add_column('inference_uploads', sa.Column('uploaded_by', sa.Integer(), nullable=True))
    op.add_column('export_jobs', sa.Column('checkpoint_sha256', sa.String(64), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('export_jobs') as batch:
        batch.drop_column('checkpoint_sha256')
    with op.batch_alter_table('inference_uploads') as batch:
        batch.drop_column('uploaded_by')
    op.drop_index('ix_validation_image_results_job_epoch', table_name='validation_image_results')
    op.drop_table('validation_image_results')
    op.drop_index('ix_deployments_training_job_id', table_name='deployments')
    op.drop_index('ix_deployments_export_job_id', table_name='deployments')
    op.drop_table('deployments')
