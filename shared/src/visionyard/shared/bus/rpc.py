"""Core NATS request-reply and hints, the sending side: no storage, a reply or a time-out.

The answering side is a service's FastStream subscribers (`broker.responder`, `broker.listener`).
"""

from __future__ import annotations

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel

from visionyard.shared import tracing
from visionyard.shared.bus.core import BusCore
from visionyard.shared.bus.errors import TransientError


class Rpc(BusCore):
    """Requests and hints over core NATS."""

    async def request(self, subject: str, payload: BaseModel, *, timeout: float = 10.0) -> bytes:
        """Core request-reply; raises `TransientError` when nobody answers in time."""
        try:
            reply = await self.nc.request(subject, payload.model_dump_json().encode(), timeout=timeout,
                                          headers=tracing.inject() if tracing.enabled() else None)
        except (NatsTimeoutError, nats.errors.NoRespondersError) as error:
            raise TransientError(f"no reply on {subject}: {type(error).__name__}") from error
        return reply.data

    async def notify(self, subject: str, payload: BaseModel) -> None:
        """Core NATS publish, no reply and no storage: a hint whose loss costs time, never data."""
        await self.nc.publish(subject, payload.model_dump_json().encode())
