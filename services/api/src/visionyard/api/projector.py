"""The projector: routes each batch of events to the domain projections, in one transaction per batch.

Each domain projects its own events beside its repository (`training.projection`, `datasets.projection`,
`exports.projection`, `inference.projection`; validation images within training's logs). This module
holds what they share: a batch is applied all-or-nothing, and an event that can never be applied
(poison) is rejected on its own while the rest of its batch is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from visionyard.api.datasets.projection import apply_dataset_event
from visionyard.api.exports.projection import project_export_event
from visionyard.api.inference.projection import project_inference_event
from visionyard.api.outbox.repository import OUTBOX_QUEUED
from visionyard.api.training.projection import ProjectionBatch, RetryPolicy, apply_job_event
from visionyard.shared.bus import PermanentError
from visionyard.shared.events import DatasetEvent, ExportInferenceEvent, JobEvent
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.api.projector")

# Times a batch is applied when a concurrent writer keeps winning the race on its job rows; then it is
# nak'ed like any transient failure.
STALE_BATCH_ATTEMPTS = 5

Token = TypeVar("Token")


@dataclass(frozen=True)
class Rejected(Generic[Token]):
    """An event that can never be applied, with the reason (it is dead-lettered)."""

    token: Token
    reason: str


class Projector:
    """Applies batches of events, one transaction per batch (one savepoint per event if one is poison)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        retry: RetryPolicy | None = None,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._retry = retry or RetryPolicy()
        # Wakes the outbox relay: a projected event may have queued a retry or a terminal marker.
        self._after_commit = after_commit

    def apply_batch(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        """Apply events in order in one transaction; returns those that are poison (not applied)."""
        for attempt in range(1, STALE_BATCH_ATTEMPTS + 1):
            try:
                return self._apply_batch_once(events)
            except StaleDataError:
                # Another writer (a callback or state-change endpoint, another replica's projector)
                # committed a job row this batch had read: the transaction rolled back whole, so the
                # batch is applied again on fresh rows (idempotent). Only PostgreSQL gets here; SQLite
                # writers are serialized by BEGIN IMMEDIATE. A nak instead would redeliver the batch
                # after later events of the same job (a progress point arriving after `completed`).
                if attempt == STALE_BATCH_ATTEMPTS:
                    raise
                log.info("job rows changed under a projection batch; applying it again (attempt %d)", attempt + 1)
        raise AssertionError("unreachable")

    def _apply_batch_once(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        # Poison is rare: apply the batch without savepoints (a savepoint per event, and the flush
        # each one forces, cost more than the events themselves — profiled) and only when an event
        # turns out to be poison, roll back and apply the batch again isolating each event.
        try:
            with self._session_factory() as session, session.begin():
                batch = ProjectionBatch.load(session, [event for _token, event in events])
                for _token, event in events:
                    apply_event(session, event, retry=self._retry, batch=batch)
                batch.rows.write()
                queued = bool(session.info.pop(OUTBOX_QUEUED, False))
        except PermanentError:
            rejected = self._apply_isolated(events)
            queued = True
        else:
            rejected = []
        # Most batches (progress, logs) queue nothing: waking the relay for them cost a query per
        # batch (profiled: ~10 % of the API's CPU on a job reporting twice a second).
        if queued and self._after_commit is not None:
            self._after_commit()
        return rejected

    def _apply_isolated(self, events: Sequence[tuple[Token, Message]]) -> list[Rejected[Token]]:
        rejected: list[Rejected[Token]] = []
        with self._session_factory() as session, session.begin():
            batch = ProjectionBatch.load(session, [event for _token, event in events])
            for token, event in events:
                savepoint = session.begin_nested()
                try:
                    apply_event(session, event, retry=self._retry, batch=batch)
                    batch.rows.write()  # inside the event's savepoint: a poison event's rows go with it
                except PermanentError as error:
                    savepoint.rollback()
                    batch.rows.discard()
                    rejected.append(Rejected(token, str(error)))
                    continue
                savepoint.commit()
        return rejected


def apply_event(
    session: Session, event: Message, *, retry: RetryPolicy | None = None, batch: ProjectionBatch | None = None
) -> None:
    """Apply one event with its domain's projection; raises PermanentError when it can never be applied.

    Within a `batch`, its metric or log row is added to `batch.rows`, which the caller writes
    before committing; without one the row is written before this returns.
    """
    if batch is None:
        batch = ProjectionBatch.load(session, [event])
        apply_event(session, event, retry=retry, batch=batch)
        batch.rows.write()
    elif isinstance(event, DatasetEvent):
        apply_dataset_event(session, event)
    elif isinstance(event, JobEvent):
        apply_job_event(session, event, retry=retry, batch=batch)
    elif isinstance(event, ExportInferenceEvent) and event.family == "export":
        project_export_event(session, event)
    elif isinstance(event, ExportInferenceEvent):
        project_inference_event(session, event)
    else:
        raise PermanentError(f"no projection for {type(event).__name__}")
