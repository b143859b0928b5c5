"""The tracker's FastStream subscribers: decode job events and tracker queries, call the use cases.

Batch acks: a poison message is dead-lettered and terminated here, alone; if the use case raises
(MLflow unavailable), the settling middleware naks every remaining message of the batch with backoff.
The job events are one batched durable consumer (`linger` batching: one MLflow `log_batch` per call),
fed by the bus's standing pull; the queries are request-reply in the `tracker` queue group.
"""

from __future__ import annotations

import logging
from typing import Any

from visionyard.shared import streams, subjects
from visionyard.shared.bus.broker import Batch, ServiceBroker, consumer, responder
from visionyard.shared.bus.settle import DeadLetters, Delivered, reject
from visionyard.shared.events import JobEvent, decode_job_event
from visionyard.shared.requests import TrackerQuery
from visionyard.tracker.service import TRACKED_KINDS, Tracker, is_valid_job_id

log = logging.getLogger("visionyard.tracker.handlers")
SERVICE = "tracker"


class TrackerHandlers:
    """Consumer and request-reply entry points of the tracker."""

    def __init__(self, *, tracker: Tracker, dead_letters: DeadLetters) -> None:
        self._tracker = tracker
        self._dead_letters = dead_letters

    async def on_job_events(self, batch: Batch) -> None:
        """Decode a fetched batch of job events and record it; poison messages are dead-lettered."""
        events: list[JobEvent] = []
        for msg in batch.raw_message:
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

    async def _reject_poison(self, msg: Delivered, error: Exception) -> None:
        await reject(self._dead_letters, msg, consumer=streams.TRACKER.durable, reason=f"PermanentError: {error}")

    async def on_metrics_query(self, query: TrackerQuery) -> dict[str, Any]:
        """`tracker.metrics`: full metric history of a job's run."""
        return await self._tracker.metrics_of(query.job_id)

    async def on_summary_query(self, query: TrackerQuery) -> dict[str, Any]:
        """`tracker.summary`: latest and best metrics of a job's run."""
        return await self._tracker.summary_of(query.job_id)


def subscribe(broker: ServiceBroker, handlers: TrackerHandlers, *, batch: int, linger: float) -> None:
    """Declare the tracker's subscribers on `broker`."""
    consumer(broker, streams.TRACKER, batch=batch, linger=linger, batched=True,
             description="Job events into MLflow runs, one log_batch per batch")(handlers.on_job_events)
    responder(broker, subjects.TRACKER_METRICS, queue=SERVICE,
              description="A job's full metric history")(handlers.on_metrics_query)
    responder(broker, subjects.TRACKER_SUMMARY, queue=SERVICE,
              description="A job's latest and best metrics")(handlers.on_summary_query)
