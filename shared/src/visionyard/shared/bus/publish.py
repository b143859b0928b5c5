"""Publishing to JetStream: de-duplicated by message id, awaited PubAcks, ordered windows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.js import api

from visionyard.shared import tracing
from visionyard.shared.bus.core import BusCore
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.bus")


class Publishing(BusCore):
    """Stored publishes, each awaited or counted."""

    async def publish(self, message: Message, *, subject: str | None = None) -> api.PubAck:
        """Publish a message to JetStream, de-duplicated by its `message_id`, awaiting the PubAck."""
        target = subject or _subject_of(message)
        return await self.publish_raw(target, message.to_bytes(), message_id=message.message_id)

    async def publish_raw(
        self, subject: str, data: bytes, *, message_id: str, headers: dict[str, str] | None = None
    ) -> api.PubAck:
        """Publish bytes to JetStream with `Nats-Msg-Id`, awaiting the PubAck."""
        all_headers = {"Nats-Msg-Id": message_id, **(headers or {})}
        if tracing.enabled() and tracing.TRACEPARENT not in all_headers:  # an outbox row keeps its request's
            all_headers = tracing.inject(all_headers)
        return await self.js.publish(subject, data, headers=all_headers)

    async def publish_ordered(self, messages: Sequence[Message], *, timeout: float = 10.0) -> int:
        """Publish messages in order, all sent before any PubAck is awaited; how many leading ones were acked.

        The acks are checked in order and counting stops at the first failure, so a caller retries
        from there (whatever was stored after it is de-duplicated by `message_id`): one round trip
        per window instead of one per message.
        """
        futures: list[asyncio.Future[api.PubAck]] = []
        trace_headers = tracing.inject() if tracing.enabled() else {}
        try:
            for message in messages:
                futures.append(
                    await self.js.publish_async(
                        _subject_of(message), message.to_bytes(),
                        headers={"Nats-Msg-Id": message.message_id, **trace_headers},
                    )
                )
        except Exception as error:  # not even sent (disconnected): count what was
            log.warning("ordered publish stopped after sending %d of %d: %s", len(futures), len(messages), error)
        acked = 0
        for future in futures:
            try:
                await asyncio.wait_for(future, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("ordered publish: %d of %d acknowledged, then %s", acked, len(messages), error)
                break
            acked += 1
        for future in futures[acked:]:
            future.cancel()  # frees its slot; the caller sends it again
        return acked


def _subject_of(message: Message) -> str:
    subject = getattr(message, "subject", None)
    if callable(subject):
        return str(subject())
    if isinstance(subject, str):
        return subject
    raise TypeError(f"{type(message).__name__} has no subject; pass one")
