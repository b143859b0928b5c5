"""dataset splits and snapshots

Revision ID: 0002_datasets
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_datasets'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        'dataset_splits',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('dataset_id', sa.String(length=64), nullable=False),
        sa.Column('content_hash', sa.String(length=128), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('default_ratio', sa.JSON(), nullable=False),
        sa.Column('seed', sa.Integer(), nullable=False),
        sa.Column('requested', sa.JSON(), nullable=False),
        sa.Column('assignment', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dataset_id', 'content_hash', name='uq_dataset_splits_version'),
    )
    op.create_index('ix_dataset_splits_dataset_id', 'dataset_splits', ['dataset_id'], unique=False)
    op.create_table(
        'dataset_snapshots',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('dataset_id', sa.String(length=64), nullable=False),
        sa.Column('content_hash', sa.String(length=128), nullable=False),
        sa.Column('version_tag', sa.String(length=128), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dataset_id', 'version_tag', name='uq_dataset_snapshots_tag'),
    )
    op.create_index('ix_dataset_snapshots_dataset_id', 'dataset_snapshots', ['dataset_id'], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index('ix_dataset_snapshots_dataset_id', table_name='dataset_snapshots')
    op.drop_table('dataset_snapshots')
    op.drop_index('ix_dataset_splits_dataset_id', table_name='dataset_splits')
    op.drop_table('dataset_splits')
