"""Broker adapters: decode what JetStream delivers and hand it to the projection use cases."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.msg import Msg

from visionyard.api.projector import Projector
from visionyard.shared import streams
from visionyard.shared.events import decode_dataset_event, decode_job_event, decode_ship_event
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.api.handlers")


class DeadLetters(Protocol):
    """Where poison messages go."""

    async def dead_letter(self, msg: Msg, *, consumer: str, reason: str) -> None:
        """Park `msg` with the reason."""
        ...


def decode_event(subject: str, data: bytes) -> Message | None:
    """The event on `subject`, None for event families the API does not project; ValueError if poison."""
    if subject.startswith("evt.job."):
        return decode_job_event(subject, data)
    if subject.startswith("evt.dataset."):
        return decode_dataset_event(subject, data)
    if subject.startswith(("evt.export.", "evt.infer.")):
        return decode_ship_event(subject, data)
    return None


class ProjectorHandler:
    """Applies each fetched batch in one transaction (in a worker thread: SQLAlchemy here is sync)."""

    def __init__(
        self,
        *,
        projector: Projector,
        dead_letters: DeadLetters,
        prepare: Callable[[Message], Awaitable[Message]] | None = None,
    ) -> None:
        self._projector = projector
        self._dead_letters = dead_letters
        # Async enrichment before the (threaded, transactional) projection, e.g. loading staged results.
        self._prepare = prepare
        self.lag = 0
        self.applied = 0

    async def handle_batch(self, messages: list[Msg]) -> None:
        """Decode, apply, dead-letter the poison; raising naks the whole batch (applied all-or-nothing)."""
        decoded: list[tuple[Msg, Message]] = []
        for msg in messages:
            try:
                event = decode_event(msg.subject, msg.data)
            except ValueError as error:
                await self._reject(msg, f"undecodable event: {error}")
                continue
            if event is not None:
                if self._prepare is not None:
                    event = await self._prepare(event)
                decoded.append((msg, event))
        rejected = await asyncio.to_thread(self._projector.apply_batch, decoded)
        for poison in rejected:
            await self._reject(poison.token, poison.reason)
        self.applied += len(decoded) - len(rejected)
        if messages and messages[-1].metadata is not None:
            self.lag = messages[-1].metadata.num_pending

    async def _reject(self, msg: Msg, reason: str) -> None:
        log.warning("dead-lettering event: %s", reason, extra={"subject": msg.subject})
        await self._dead_letters.dead_letter(msg, consumer=streams.API_PROJECTOR.durable, reason=reason)
        await msg.term()
