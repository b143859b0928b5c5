"""Base message models: every command and event carries an id, a timestamp and a schema version."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


def new_message_id() -> str:
    """A fresh message id; it doubles as the JetStream `Nats-Msg-Id` de-duplication key."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Every message on the bus: identified, timestamped, versioned."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: ClassVar[int] = 1

    message_id: str = Field(default_factory=new_message_id)
    occurred_at: datetime = Field(default_factory=utc_now)
    version: int = Field(default=1, description="schema version of the producer")

    def to_bytes(self) -> bytes:
        """JSON encoding used on the wire."""
        return self.model_dump_json().encode()


class JobMessage(Message):
    """A message about one job attempt; `seq` is monotonic per (job_id, attempt) at its producer."""

    job_id: str
    attempt: int = Field(ge=1)
    seq: int = Field(default=0, ge=0)
