"""SQLite sessions: writers take the write lock up front, reads outside a unit of work never take it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.models import TrainingJob
from visionyard.api.db.session import UnitOfWork, make_engine, make_session_factory, reading
from visionyard.api.outbox.relay import OutboxRelay
from visionyard.api.service import PlatformStatus


def _finishes_beside_a_writer(tmp_path: Path, read: Callable[[Any], object]) -> bool:
    """Whether `read(session_factory)` completes while another connection holds the write lock."""
    engine = make_engine(f"sqlite:///{tmp_path / 'api.db'}")
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    done = threading.Event()

    def reader() -> None:
        read(factory)
        done.set()

    with UnitOfWork(factory).transaction() as session:
        session.execute(select(func.count()).select_from(TrainingJob))  # BEGIN IMMEDIATE: the write lock is held
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        # A reader that took the write lock would wait here for the busy timeout (30 s), not 10.
        finished = done.wait(timeout=10)
    thread.join()
    engine.dispose()
    return finished


def _count_jobs(factory: Any) -> None:
    with reading(factory) as session:
        session.scalar(select(func.count()).select_from(TrainingJob))


def test_a_reading_session_does_not_wait_for_the_writer(tmp_path: Path) -> None:
    assert _finishes_beside_a_writer(tmp_path, _count_jobs)


def test_the_status_gauges_and_the_outbox_backlog_read_without_the_write_lock(tmp_path: Path) -> None:
    def gauges(factory: Any) -> None:
        status = PlatformStatus(factory)
        status.jobs_by_status()
        status._ping_database()
        OutboxRelay(session_factory=factory, publisher=None).count_backlog()  # type: ignore[arg-type]

    assert _finishes_beside_a_writer(tmp_path, gauges)
