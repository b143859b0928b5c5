"""Structured JSON logging with bound context (job_id, attempt, seq, subject, delivery)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_CONTEXT_KEYS = ("service", "job_id", "attempt", "seq", "subject", "delivery", "consumer", "dataset_id")


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
        for key in _CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                payload[key] = value
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
