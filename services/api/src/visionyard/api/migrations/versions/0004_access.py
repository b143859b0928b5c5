"""users, API keys, projects and members; integer job ids

Revision ID: 0004_access
Revises: 0003_exports_inference

Existing rows are carried over: every distinct `project_id` string becomes a project ("default" becomes
"Uncategorized"), owned by nobody until the first admin adopts it at start-up; every training, export and
inference job gets an integer id (oldest first), its child rows follow. Jobs keep their MLflow runs and
stored files under their old ids; upgrade with no job running. Downgrade drops the new tables and keeps
the integer ids.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_access'
down_revision = '0003_exports_inference'  # on the jobs' branch (datasets' own stays a separate head)
branch_labels = None
depends_on = None

PROJECT_TABLES = ('datasets', 'training_jobs', 'export_jobs', 'inference_jobs')
# Parent table → (child table, column) pairs holding its id.
JOB_CHILDREN = {
    'training_jobs': (
        ('training_metrics', 'job_id'), ('training_logs', 'job_id'), ('checkpoints', 'job_id'),
        ('export_jobs', 'training_job_id'), ('inference_jobs', 'training_job_id'),
        ('inference_uploads', 'training_job_id'),
    ),
    'export_jobs': (),
    'inference_jobs': (('inference_results', 'inference_job_id'),),
}
JOB_KINDS = {'training_jobs': 'training', 'export_jobs': 'export', 'inference_jobs': 'inference'}


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        'users',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('email', sa.String(320), nullable=False),
        sa.Column('password_hash', sa.Text(), nullable=False),
        sa.Column('full_name', sa.String(256), nullable=True),
        sa.Column('company', sa.String(256), nullable=True),
        sa.Column('division', sa.String(256), nullable=True),
        sa.Column('department', sa.String(256), nullable=True),
        sa.Column('phone_number', sa.String(64), nullable=True),
        sa.Column('bio', sa.Text(), nullable=True),
        sa.Column('badge_color', sa.String(32), nullable=True),
        sa.Column('system_role', sa.String(32), nullable=False),
        sa.Column('is_active', sa.Boolean(), nullable=False),
        sa.Column('token_version', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_users_email', 'users', ['email'], unique=True)
    op.create_table(
        'api_keys',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('user_id', sa.Integer(), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('name', sa.String(128), nullable=False),
        sa.Column('prefix', sa.String(16), nullable=False),
        sa.Column('key_digest', sa.String(64), nullable=False),
        sa.Column('project_ids', sa.JSON(), nullable=False),
        sa.Column('read_only', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index('ix_api_keys_user_id', 'api_keys', ['user_id'])
    op.create_index('ix_api_keys_key_digest', 'api_keys', ['key_digest'], unique=True)
    op.create_table(
        'projects',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('name', sa.String(256), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('task_type', sa.String(64), nullable=True),
        sa.Column('owner_id', sa.Integer(), sa.ForeignKey('users.id', ondelete='SET NULL'), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        'project_members',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('project_id', sa.Integer(), sa.ForeignKey('projects.id', ondelete='CASCADE'), nullable=False),
        sa.Column('user_id', sa.Integer(), sa.ForeignKey('users.id', ondelete='CASCADE'), nullable=False),
        sa.Column('role', sa.String(16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint('project_id', 'user_id', name='uq_project_members_user'),
    )
    op.create_index('ix_project_members_project_id', 'project_members', ['project_id'])
    op.create_index('ix_project_members_user_id', 'project_members', ['user_id'])
    op.create_table(
        'job_numbers',
        sa.Column('id', sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    bind = op.get_bind()
    _carry_over_projects(bind)
    _number_jobs(bind)


def _carry_over_projects(bind: sa.Connection) -> None:
    metadata = sa.MetaData()
    projects = sa.Table('projects', metadata, autoload_with=bind)
    tables = [sa.Table(name, metadata, autoload_with=bind) for name in PROJECT_TABLES]
    names: set[str] = set()
    for table in tables:
        names.update(value for (value,) in bind.execute(sa.select(table.c.project_id).distinct()))
    now = sa.func.now()
    for name in sorted(names):
        new_id = bind.execute(
            projects.insert().values(name='Uncategorized' if name == 'default' else name, created_at=now,
                                     updated_at=now).returning(projects.c.id)
        ).scalar_one()
        for table in tables:
            bind.execute(table.update().where(table.c.project_id == name).values(project_id=str(new_id)))


def _number_jobs(bind: sa.Connection) -> None:
    metadata = sa.MetaData()
    numbers = sa.Table('job_numbers', metadata, autoload_with=bind)
    now = sa.func.now()
    for parent_name, children in JOB_CHILDREN.items():
        parent = sa.Table(parent_name, metadata, autoload_with=bind)
        rows = bind.execute(sa.select(parent).order_by(parent.c.created_at, parent.c.id)).mappings().all()
        for row in rows:
            new_id = str(bind.execute(
                numbers.insert().values(kind=JOB_KINDS[parent_name], created_at=now).returning(numbers.c.id)
            ).scalar_one())
            if not children:
                bind.execute(parent.update().where(parent.c.id == row['id']).values(id=new_id))
                continue
            # Copy, re-point the children, delete: works under enforced foreign keys on both backends.
            bind.execute(parent.insert().values({**row, 'id': new_id}))
            for child_name, column in children:
                child = sa.Table(child_name, metadata, autoload_with=bind)
                bind.execute(child.update().where(child.c[column] == row['id']).values({column: new_id}))
            bind.execute(parent.delete().where(parent.c.id == row['id']))


def downgrade() -> None:
    """Revert this revision (job ids stay integers; project ids stay the carried-over numbers)."""
    op.drop_table('job_numbers')
    op.drop_index('ix_project_members_user_id', table_name='project_members')
    op.drop_index('ix_project_members_project_id', table_name='project_members')
    op.drop_table('project_members')
    op.drop_table('projects')
    op.drop_index('ix_api_keys_key_digest', table_name='api_keys')
    op.drop_index('ix_api_keys_user_id', table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_index('ix_users_email', table_name='users')
    op.drop_table('users')
