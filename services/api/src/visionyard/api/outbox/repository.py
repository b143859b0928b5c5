"""The outbox's repository: messages queued in the transaction of the change they announce. It never commits."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from visionyard.api.db.models import OutboxMessage
from visionyard.shared import subjects, tracing
from visionyard.shared.messages import Message

# Set in `Session.info` when a transaction queued outbox rows: whoever commits it knows to wake the relay.
OUTBOX_QUEUED = "visionyard.outbox_queued"


class OutboxRepository:
    """Messages waiting to be published."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, message: Message, *, subject: str | None = None) -> None:
        """Queue a bus message, published on its own subject (or `subject`)."""
        target = subject or _subject_of(message)
        self.add_raw(subject=target, payload=message.to_bytes(), message_id=message.message_id)

    def add_raw(self, *, subject: str, payload: bytes, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Queue raw bytes (e.g. a KV put on `$KV.<bucket>.<key>`)."""
        self.session.info[OUTBOX_QUEUED] = True
        # The trace context of the request (or event) that wrote the row travels with the message.
        headers = tracing.inject(headers) if tracing.enabled() else (headers or {})
        self.session.add(OutboxMessage(message_id=message_id, subject=subject, payload=payload, headers=headers))

    def add_kv_put(self, *, bucket: str, key: str, value: dict[str, Any], message_id: str) -> None:
        """Queue a durable KV write."""
        self.add_raw(subject=subjects.kv_put(bucket, key), payload=json.dumps(value).encode(), message_id=message_id)

    def unsent(self, *, limit: int) -> list[OutboxMessage]:
        """The oldest unsent rows, locked so another API replica skips them (PostgreSQL)."""
        query = select(OutboxMessage).where(OutboxMessage.sent_at.is_(None)).order_by(OutboxMessage.id).limit(limit)
        if self.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return list(self.session.scalars(query).all())

    def backlog(self) -> int:
        """How many rows wait to be published."""
        return self.session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
        ) or 0

    def mark_sent(self, row: OutboxMessage, at: datetime) -> None:
        """Record that the broker stored a row's message."""
        row.sent_at = at


def _subject_of(message: Message) -> str:
    subject = getattr(message, "subject", None)
    if callable(subject):
        return str(subject())
    if isinstance(subject, str):
        return subject
    raise TypeError(f"{type(message).__name__} has no subject")
