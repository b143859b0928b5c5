"""Thin broker adapters: decode job events and tracker queries, call the use cases.

Batch acks: a poison message is dead-lettered and terminated here, alone; if the use case raises
(MLflow unavailable), the bus naks every remaining message of the batch with backoff.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from nats.aio.msg import Msg

from visionyard.shared import streams, subjects
from visionyard.shared.events import JobEvent, TrackerQuery, decode_job_event
from visionyard.shared.logs import bind
from visionyard.tracker.service import TRACKED_KINDS, Tracker, is_valid_job_id

log = logging.getLogger("visionyard.tracker.handlers")


class DeadLetters(Protocol):
    """Where poison messages are parked."""

    async def dead_letter(self, msg: Msg, *, consumer: str, reason: str) -> None:
        """Park `msg` with the reason."""
        ...


class TrackerHandlers:
    """Consumer and request-reply entry points of the tracker."""

    def __init__(self, *, tracker: Tracker, dead_letters: DeadLetters) -> None:
        self._tracker = tracker
        self._dead_letters = dead_letters

    async def on_job_events(self, messages: list[Msg]) -> None:
        """Decode a fetched batch of job events and record it; poison messages are dead-lettered."""
        events: list[JobEvent] = []
        for msg in messages:
            if subjects.job_event_kind(msg.subject) not in TRACKED_KINDS:
                continue  # acked untouched by the bus
            try:
                event = decode_job_event(msg.subject, msg.data)
                if not is_valid_job_id(event.job_id):
                    raise ValueError(f"invalid job id {event.job_id!r}")
            except ValueError as error:  # includes pydantic's ValidationError
                await self._reject_poison(msg, error)
                continue
            events.append(event)
        if events:
            await self._tracker.record_events(events)

    async def _reject_poison(self, msg: Msg, error: Exception) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        bind(log, subject=msg.subject, delivery=delivered).warning("dead-lettering undecodable event: %s", error)
        await self._dead_letters.dead_letter(msg, consumer=streams.TRACKER.durable, reason=f"PermanentError: {error}")
        await msg.term()

    async def on_metrics_query(self, data: bytes) -> bytes:
        """`tracker.metrics`: full metric history of a job's run."""
        query = TrackerQuery.model_validate_json(data)
        return json.dumps(await self._tracker.metrics_of(query.job_id)).encode()

    async def on_summary_query(self, data: bytes) -> bytes:
        """`tracker.summary`: latest and best metrics of a job's run."""
        query = TrackerQuery.model_validate_json(data)
        return json.dumps(await self._tracker.summary_of(query.job_id)).encode()
