"""Asks the tracker (request-reply) for a job's MLflow metrics or summary."""

from __future__ import annotations

import json
from typing import Any

from visionyard.api.errors import Unavailable
from visionyard.shared import subjects
from visionyard.shared.bus import Bus, TransientError
from visionyard.shared.requests import TrackerQuery


class BusTrackerClient:
    """The tracker as the API sees it."""

    def __init__(self, bus: Bus, *, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def metrics(self, job_id: str) -> dict[str, Any]:
        """`tracker.metrics` for one job."""
        return await self._ask(subjects.TRACKER_METRICS, job_id)

    async def summary(self, job_id: str) -> dict[str, Any]:
        """`tracker.summary` for one job."""
        return await self._ask(subjects.TRACKER_SUMMARY, job_id)

    async def _ask(self, subject: str, job_id: str) -> dict[str, Any]:
        try:
            raw = await self._bus.request(subject, TrackerQuery(job_id=job_id), timeout=self._timeout)
        except TransientError as error:
            raise Unavailable(f"the tracker service did not answer {subject}: {error}") from error
        except Exception as error:  # broker disconnected
            raise Unavailable(f"the tracker service is unreachable ({subject}): {error}") from error
        try:
            answer = json.loads(raw)
        except ValueError as error:
            raise Unavailable(f"the tracker service sent an unreadable reply on {subject}") from error
        if not isinstance(answer, dict):
            raise Unavailable(f"the tracker service sent an unexpected reply on {subject}")
        if answer.get("ok") is False and "error" in answer:
            raise Unavailable(f"the tracker service failed on {subject}: {answer['error']}")
        return answer
