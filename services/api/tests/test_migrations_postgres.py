"""The shipped Alembic migrations create the schema on PostgreSQL too (skipped when none is reachable)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.models import Base, OutboxMessage
from visionyard.api.db.repositories import OutboxRepository
from visionyard.api.db.session import make_session_factory

from .pgschema import fresh_postgres_schema

pytestmark = pytest.mark.integration


def test_migrations_run_on_postgresql_and_outbox_rows_lock() -> None:
    with fresh_postgres_schema() as (engine, schema):
        upgrade_to_head(engine)
        upgrade_to_head(engine)  # idempotent: already at head
        tables = set(inspect(engine).get_table_names(schema=schema))
        assert set(Base.metadata.tables) <= tables
        session_factory = make_session_factory(engine)
        with session_factory() as session, session.begin():
            session.add(OutboxMessage(message_id="m1", subject="cmd.train", payload=b"{}", headers={}))
        with session_factory() as first, first.begin():
            locked = OutboxRepository(first).unsent(limit=10)
            assert [row.message_id for row in locked] == ["m1"]
            with session_factory() as second, second.begin():
                assert OutboxRepository(second).unsent(limit=10) == []  # SKIP LOCKED: another replica skips it
