"""The NATS/JetStream adapter every service uses, by concern.

- `errors`: handler errors and the one outcome-to-ack mapping (`decide_ack`); no NATS import.
- `core`: the connection (client, JetStream context, the NATS user's access).
- `topology`: streams, consumers, KV buckets, the staging object store.
- `publish`: stored publishes, de-duplicated by message id, PubAcks awaited.
- `consume`: durable pull consumers kept standing on the server (`pull_loop`), the claimer, dead-lettering.
- `objects`: the staging object store's chunked put and pull-consumer read.
- `rpc`: core requests and hints, sent (the answering side is `broker`'s responders and listeners).
- `held`: one long-held message (a training, export or inference command) kept alive by heartbeats.
- `broker`: the FastStream broker of a service on the same connection, and its middlewares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visionyard.shared.bus.consume import Consuming
from visionyard.shared.bus.errors import AckAction, AckDecision, PermanentError, TransientError, decide_ack
from visionyard.shared.bus.objects import Objects
from visionyard.shared.bus.rpc import Rpc

if TYPE_CHECKING:
    from visionyard.shared.bus.broker import ServiceBroker

__all__ = ["AckAction", "AckDecision", "Bus", "PermanentError", "TransientError", "decide_ack"]


class Bus(Consuming, Objects, Rpc):
    """A connection to NATS with JetStream, and the operations services need on it."""

    _broker: ServiceBroker | None = None

    @classmethod
    async def from_broker(cls, broker: ServiceBroker) -> Bus:
        """Connect `broker` and return the bus on its connection: one NATS connection per service.

        The broker's durable-consumer subscribers run on this bus's standing pull and dead-letter through it.
        """
        nc = await broker.connect()
        bus = cls(nc, service=broker.service, access=broker.access)
        bus._broker = broker
        broker.bus = bus
        broker.dead_letters = bus
        return bus

    async def close(self) -> None:
        """Stop the broker's subscribers (each finishing its message) and drain the connection."""
        if self._broker is not None:
            await self._broker.stop()
            return
        await super().close()
