"""A fresh schema on the local PostgreSQL for one test (skipped when none is reachable)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, text

from visionyard.api.db.session import make_engine

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def fresh_postgres_schema() -> Iterator[tuple[Engine, str]]:
    """An engine whose search_path is a new, empty schema, and that schema's name; dropped afterwards."""
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
        yield engine, schema
    finally:
        engine.dispose()
        with probe.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        probe.dispose()
