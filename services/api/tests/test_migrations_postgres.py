"""The shipped Alembic migrations create the schema on PostgreSQL too (skipped when none is reachable)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import inspect, text

from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.models import Base, OutboxMessage
from visionyard.api.db.repositories import OutboxRepository
from visionyard.api.db.session import make_engine, make_session_factory

pytestmark = pytest.mark.integration

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def test_migrations_run_on_postgresql_and_outbox_rows_lock() -> None:
    try:
        probe = make_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {type(error).__name__}")
    schema = f"vy_test_{uuid.uuid4().hex[:10]}"
    with probe.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
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
    finally:
        engine.dispose()
        with probe.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        probe.dispose()
