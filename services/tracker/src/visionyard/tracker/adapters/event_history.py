"""Reads a job's last `started` event back from the EVENTS stream (JetStream's last-by-subject get)."""

from __future__ import annotations

from nats.js.errors import NotFoundError

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import JobStarted


class JetStreamStartedEvents:
    """`StartedEventLookup` over the EVENTS stream."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def last_started(self, job_id: str) -> JobStarted | None:
        """The newest retained `started` event of the job, or None."""
        try:
            raw = await self._bus.js.get_last_msg(streams.EVENTS.name, subjects.job_event(job_id, JobStarted.kind))
        except NotFoundError:
            return None
        if not raw.data:
            return None
        try:
            return JobStarted.from_bytes(raw.data)
        except ValueError:  # an undecodable `started` is dead-lettered by the consumer; nothing to rebuild from
            return None
