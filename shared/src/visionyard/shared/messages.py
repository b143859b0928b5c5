"""Base message models: every command and event carries an id, a timestamp and a schema version.

The schema version is `major.minor` and travels in the message itself (`schema_version`). A minor
bump only adds optional fields, which older readers ignore (`extra="ignore"`); a major bump changes
what a field means, so a reader refuses a major it does not know (`SchemaVersionError`, dead-lettered
with its reason) instead of guessing. Messages stored before the version was on the wire carry none
and are read as 1.x.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# The version this code writes, and the major it reads.
SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1
# The same version as a message header, for transports that read headers before the body.
SCHEMA_VERSION_HEADER = "Visionyard-Schema-Version"
SCHEMA_VERSION_FIELD = "schema_version"
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?$")


class SchemaVersionError(ValueError):
    """A message written under a schema major version this code does not read, or an unreadable version."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_message_id() -> str:
    """A fresh message id; it doubles as the JetStream `Nats-Msg-Id` de-duplication key."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def check_schema_version(source: bytes | str | Mapping[str, Any] | None) -> None:
    """Raise `SchemaVersionError` unless `source` was written under a major version this code reads.

    `source` is a message's JSON, its decoded object, or its headers (`SCHEMA_VERSION_HEADER`). A
    missing version reads as 1.x; JSON that is not an object is left to the decoder to reject.
    """
    version: Any = None
    if isinstance(source, (bytes, bytearray, memoryview, str)):
        try:
            source = json.loads(bytes(source) if not isinstance(source, str) else source)
        except ValueError:
            return
    if isinstance(source, Mapping):
        version = source.get(SCHEMA_VERSION_FIELD, source.get(SCHEMA_VERSION_HEADER))
    if version is None:
        return
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None:
        raise SchemaVersionError(f"schema_version {version!r} is not major.minor (this reader reads {SCHEMA_MAJOR}.x)")
    if int(match.group(1)) != SCHEMA_MAJOR:
        raise SchemaVersionError(f"schema_version {version} is of major version {match.group(1)}; "
                                 f"this reader reads {SCHEMA_MAJOR}.x only")


class Message(BaseModel):
    """Every message on the bus: identified, timestamped, versioned."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    message_id: str = Field(default_factory=new_message_id)
    occurred_at: datetime = Field(default_factory=utc_now)
    schema_version: str = Field(default=SCHEMA_VERSION, description="major.minor schema version of the producer")

    @field_validator("schema_version", mode="before")
    @classmethod
    def _readable_version(cls, version: Any) -> Any:
        # Every way of decoding checks it (FastStream's typed handlers validate the model themselves);
        # pydantic reports it as a ValidationError whose message is this reason.
        check_schema_version({SCHEMA_VERSION_FIELD: version})
        return version

    def to_bytes(self) -> bytes:
        """JSON encoding used on the wire."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Self:
        """Decode from the wire; `SchemaVersionError` (not pydantic's ValidationError) for a major
        version this code does not read, so the reason is the version, not whichever field it changed."""
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            check_schema_version(data)  # the raw JSON is parsed again only on this error path
            raise


class JobMessage(Message):
    """A message about one job attempt; `seq` is monotonic per (job_id, attempt) at its producer."""

    job_id: str
    attempt: int = Field(ge=1)
    seq: int = Field(default=0, ge=0)
