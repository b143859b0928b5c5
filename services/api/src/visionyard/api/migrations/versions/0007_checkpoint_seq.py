"""checkpoints remember the seq of the staging behind their file

Revision ID: 0007_checkpoint_seq
Revises: 0006_scheduling

A staging or store redelivered after a newer file of its kind (an API killed mid-batch) is told apart by
(attempt, seq); rows from before this revision have no seq and are ordered by attempt alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_checkpoint_seq'
down_revision = '0006_scheduling'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('checkpoints') as batch:
        batch.add_column(sa.Column('seq', sa.Integer(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('checkpoints') as batch:
        batch.drop_column('seq')
