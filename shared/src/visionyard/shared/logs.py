"""Structured JSON logging with bound context (job_id, attempt, seq, subject, delivery) and the trace id.

`job_context` binds a job and attempt to everything logged in its task (and the tasks it starts), so a
line logged deep in an adapter still says which job it was about.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from visionyard.shared import tracing

_CONTEXT_KEYS = ("service", "job_id", "attempt", "seq", "subject", "delivery", "consumer", "dataset_id")
# Read-only default: one object shared by every context, so binding copies it (job_context) instead of mutating.
_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "visionyard_log_context", default=MappingProxyType({})
)


@contextmanager
def job_context(**context: Any) -> Iterator[None]:
    """Add `context` (job_id, attempt) to every record logged in this context, unless a record names its own."""
    token = _bound.set({**_bound.get(), **context})
    try:
        yield
    finally:
        _bound.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _bound.get()
        for key in _CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is None:
                value = bound.get(key)
            if value is not None:
                payload[key] = value
        trace_id = tracing.trace_id()
        if trace_id is not None:
            payload["trace_id"] = trace_id
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON logs to stderr; quiet the chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("nats", "alembic", "urllib3", "botocore", "uvicorn.access", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bind(logger: logging.Logger, **context: Any) -> logging.LoggerAdapter[logging.Logger]:
    """A logger that adds `context` to every record."""
    return logging.LoggerAdapter(logger, context)
