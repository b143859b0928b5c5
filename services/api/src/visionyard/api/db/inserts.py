"""Inserts that skip rows whose unique key exists: the second guard of the idempotent projections."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Insert, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session


def insert_ignoring_duplicates(session: Session, table: Table, keys: tuple[str, ...]) -> Insert | None:
    """An INSERT of `table` that skips rows whose unique `keys` exist; None on other dialects than ours."""
    # A Core insert on the table with the rows as parameters (not ORM `.values(...)`) skips the ORM
    # bulk path and the autoflush of every dirty object, and on SQLite `INSERT OR IGNORE` (unlike the
    # dialect's `on_conflict_do_nothing`, which SQLAlchemy never caches) compiles once (profiled).
    # The unique key is the only constraint these rows can violate (the caller fills every column).
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing(index_elements=list(keys))
    if dialect == "sqlite":
        return table.insert().prefix_with("OR IGNORE")
    return None


def insert_ignoring_duplicate(session: Session, model: type[Any], row: dict[str, Any], keys: tuple[str, ...]) -> bool:
    """Insert one `row` of `model` unless its unique `keys` exist; whether it was inserted."""
    statement = insert_ignoring_duplicates(session, model.__table__, keys)
    if statement is None:  # pragma: no cover - other dialects check first
        existing = session.scalars(select(model).filter_by(**{key: row[key] for key in keys})).first()
        if existing is not None:
            return False
        session.add(model(**row))
        session.flush()
        return True
    if session.new:
        session.flush()  # this row may reference an object that is not in the database yet
    # Session.execute is typed as returning rows; a DML statement's result is a CursorResult.
    result = cast(CursorResult[Any], session.execute(statement, row))
    return bool(result.rowcount)
