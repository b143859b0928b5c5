"""The API's own use cases at its root: what operations ask of the platform (readiness, jobs by status).

Each domain keeps its use cases in its own package (`training.service`, `datasets.service`, ...); what
is left here belongs to none of them. The HTTP side (`handlers.py`) only maps the answers to responses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.db.session import reading
from visionyard.api.ports import BrokerLink
from visionyard.api.training.repository import JobRepository


@dataclass(frozen=True)
class Readiness:
    """Whether the API can serve, with each dependency's verdict ("ok" or why not)."""

    ready: bool
    checks: dict[str, str]


class PlatformStatus:
    """Readiness and the jobs-by-status gauge, read from the platform database and the broker link."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    async def readiness(self, broker: BrokerLink | None) -> Readiness:
        """The database answers and the broker is connected (None: not connected yet)."""
        checks = {"database": "ok", "broker": "ok"}
        try:
            await asyncio.to_thread(self._ping_database)
        except Exception as error:
            checks["database"] = f"unavailable: {error}"
        if broker is None or not broker.is_connected:
            checks["broker"] = "unavailable: not connected"
        return Readiness(ready=all(value == "ok" for value in checks.values()), checks=checks)

    def jobs_by_status(self) -> dict[str, int]:
        """How many training jobs are in each status."""
        with reading(self._session_factory) as session:
            return JobRepository(session).count_by_status()

    def _ping_database(self) -> None:
        with reading(self._session_factory) as session:
            session.execute(text("SELECT 1"))
