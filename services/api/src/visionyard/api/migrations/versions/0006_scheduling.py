"""job priorities and queue order; project fair-share weights and quotas

Revision ID: 0006_scheduling
Revises: 0005_frontend_calls

Every existing job gets priority 50 (`normal`); every project weight 1 and no quota.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_scheduling'
down_revision = '0005_frontend_calls'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('training_jobs') as batch:
        batch.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='50'))
        batch.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('projects') as batch:
        batch.add_column(sa.Column('share_weight', sa.Integer(), nullable=False, server_default='1'))
        batch.add_column(sa.Column('max_running_jobs', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('max_gpus', sa.Integer(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('projects') as batch:
        batch.drop_column('max_gpus')
        batch.drop_column('max_running_jobs')
        batch.drop_column('share_weight')
    with op.batch_alter_table('training_jobs') as batch:
        batch.drop_column('queued_at')
        batch.drop_column('priority')
