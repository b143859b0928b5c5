"""The PostgreSQL the database tests run on: a fresh schema per test, dropped afterwards.

`VISIONYARD_TEST_DATABASE_URL` (set by `.ci/run`) names the server and makes it required: every database
test then runs on it and a PostgreSQL test that cannot reach it fails instead of skipping. Without it (a
user's machine) the tests probe the local default URL and skip their PostgreSQL variants when it is absent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, make_url, text

from visionyard.api.db.session import make_engine

ENV_VAR = "VISIONYARD_TEST_DATABASE_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_required() -> bool:
    """Whether CI named a PostgreSQL the database tests must run on."""
    return bool(os.environ.get(ENV_VAR, "").strip())


def postgres_url() -> str:
    """The SQLAlchemy URL of the test PostgreSQL (the CI's, else the local default)."""
    return os.environ.get(ENV_VAR, "").strip() or DEFAULT_POSTGRES_URL


def url_in_schema(schema: str) -> str:
    """The test PostgreSQL's URL with `schema` as its search path, for code that takes only a URL."""
    url = make_url(postgres_url())
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def _unreachable(reason: str) -> None:
    # In CI a PostgreSQL test that skips would hide that it never ran: fail it instead.
    if postgres_required():
        pytest.fail(f"{ENV_VAR} is set but PostgreSQL is not usable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not reachable at {postgres_url()}: {reason}")


@contextmanager
def fresh_postgres_schema() -> Iterator[tuple[Engine, str]]:
    """An engine whose search_path is a new, empty schema, and that schema's name; dropped afterwards."""
    probe = make_engine(postgres_url(), connect_args={"connect_timeout": 2})
    problem = ""
    try:
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        problem = f"{type(error).__name__}: {error}".splitlines()[0]
    if problem:
        probe.dispose()
        _unreachable(problem)
    # A unique name per test: concurrent runs (and a rerun after a killed one) never collide.
    schema = f"vy_test_{uuid.uuid4().hex[:12]}"
    with probe.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(url_in_schema(schema))
    try:
        yield engine, schema
    finally:
        engine.dispose()
        with probe.begin() as connection:
            # Bounded: a session the test left open in a transaction fails the drop instead of hanging it.
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        probe.dispose()


@contextmanager
def fresh_postgres_url() -> Iterator[str]:
    """The URL of a new, empty schema for code that builds its own engine (the app); dropped afterwards."""
    with fresh_postgres_schema() as (engine, schema):
        engine.dispose()
        yield url_in_schema(schema)
