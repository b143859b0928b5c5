"""The shipped Alembic migrations on SQLite and PostgreSQL: each revision upgrades, downgrades and re-upgrades
cleanly (parametrised over every revision, so a new migration is covered without touching this file), head
matches the models, and downgrading to base leaves no table behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

import visionyard.api.db.models_datasets  # noqa: F401  (registers its tables on Base.metadata)
import visionyard.api.db.models_exports  # noqa: F401
from visionyard.api.db.migrate import alembic_config, upgrade_to_head
from visionyard.api.db.models import Base, OutboxMessage
from visionyard.api.db.session import make_engine, make_session_factory
from visionyard.api.outbox.repository import OutboxRepository

from ..pgschema import fresh_postgres_schema

pytestmark = pytest.mark.integration

REVISIONS = [script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()]
KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of each supported kind (PostgreSQL: a fresh schema, dropped afterwards)."""
    if request.param == "sqlite":
        sqlite = make_engine(f"sqlite:///{tmp_path / 'migrations.db'}")
        yield sqlite
        sqlite.dispose()
        return
    with fresh_postgres_schema() as (postgres, _schema):
        yield postgres


def _migrate(engine: Engine, direction: str, target: str) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, direction)(config, target)


def _schema(engine: Engine) -> dict[str, Any]:
    """Every table with its columns (name, type, nullability), indexes, unique and foreign keys."""
    inspector = inspect(engine)
    shape: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        shape[table] = {
            "columns": sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys(table)),
        }
    return shape


def _versions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        if "alembic_version" not in inspect(connection).get_table_names():
            return set()
        return {row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))}


def _parents(revision: str) -> list[str]:
    down = ScriptDirectory.from_config(alembic_config()).get_revision(revision).down_revision
    if down is None:
        return []
    return [down] if isinstance(down, str) else list(down)


def test_there_are_revisions_to_test() -> None:
    assert "0001" in REVISIONS  # a broken script directory must not turn the parametrised test into nothing


@pytest.mark.parametrize("revision", REVISIONS)
def test_revision_upgrades_downgrades_and_upgrades_again(engine: Engine, revision: str) -> None:
    parents = _parents(revision)
    for parent in parents:
        _migrate(engine, "upgrade", parent)
    before = _schema(engine)
    _migrate(engine, "upgrade", revision)
    after = _schema(engine)
    assert _versions(engine) == {revision}
    assert after != before, f"revision {revision} changes nothing"
    # Alone at the top after upgrading to it, so one step down reverts exactly this revision.
    _migrate(engine, "downgrade", "-1")
    assert _schema(engine) == before
    assert _versions(engine) == set(parents)
    _migrate(engine, "upgrade", revision)
    assert _schema(engine) == after


def test_head_matches_the_models_and_base_leaves_nothing(engine: Engine) -> None:
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # idempotent: already at head
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert differences == []
    _migrate(engine, "downgrade", "base")
    assert _schema(engine) == {}
    assert _versions(engine) == set()


@pytest.mark.postgresql
def test_outbox_rows_lock_on_postgresql() -> None:
    with fresh_postgres_schema() as (engine, _schema_name):
        upgrade_to_head(engine)
        session_factory = make_session_factory(engine)
        with session_factory() as session, session.begin():
            session.add(OutboxMessage(message_id="m1", subject="cmd.train", payload=b"{}", headers={}))
        with session_factory() as first, first.begin():
            locked = OutboxRepository(first).unsent(limit=10)
            assert [row.message_id for row in locked] == ["m1"]
            with session_factory() as second, second.begin():
                assert OutboxRepository(second).unsent(limit=10) == []  # SKIP LOCKED: another replica skips it
