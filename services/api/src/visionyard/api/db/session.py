"""Engine, sessions and the unit of work that owns the transaction boundary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# Execution option marking a read-only unit of work's connection (see `UnitOfWork.read`).
READ_ONLY = "visionyard_read_only"


def make_engine(url: str, **options: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when a transaction begins (see `_begin_immediate`).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # WAL lets the projector write while request threads read.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            # Take the write lock up front: a WAL reader that later tries to write after another
            # connection committed fails at once with "database is locked" (its snapshot is stale),
            # whereas IMMEDIATE waits on the busy timeout instead. Read-only sessions never write,
            # so they begin deferred: otherwise every GET queues behind the projector's write
            # transactions and holds them up in turn (profiled under event load).
            if connection.get_execution_options().get(READ_ONLY):
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **options)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (they are serialized afterwards)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


class UnitOfWork:
    """One transaction: repositories add to it, only `transaction()` commits, then it signals.

    `after_commit` is how the outbox relay learns right away that there are new rows to publish.
    """

    def __init__(self, session_factory: sessionmaker[Session], *, after_commit: Callable[[], None] | None = None) -> None:
        self._session_factory = session_factory
        self._after_commit = after_commit

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on normal exit and rolled back on error."""
        with self._session_factory() as session:
            with session.begin():
                yield session
        if self._after_commit is not None:
            self._after_commit()

    def read(self) -> AbstractContextManager[Session]:
        """A session for reads only (on SQLite it does not take the write lock)."""
        return reading(self._session_factory)


@contextmanager
def reading(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session of `session_factory` for reads only: on SQLite it begins deferred, so it neither waits for
    the projector's write transactions nor holds the next one up (every read outside a unit of work)."""
    bind = session_factory.kw.get("bind")
    options = {"bind": bind.execution_options(**{READ_ONLY: True})} if bind is not None else {}
    with session_factory(**options) as session:
        yield session
