"""The small ports the API's root handlers and use cases need from the broker; adapters (and fakes) implement them.

Protocols over what is read of a delivered message, so that handlers name no nats-py type: the bus hands
them nats-py messages, tests hand them anything with the same attributes.
"""

from __future__ import annotations

from typing import Any, Protocol

from visionyard.shared.bus import settle

# A message as the broker delivered it: the bus's one Protocol of it (subject, data, metadata, settling).
Delivered = settle.Delivered


class BrokerLink(Protocol):
    """The API's connection to the broker, as readiness sees it."""

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up."""
        ...


class DeadLetters(Protocol):
    """Where poison messages go."""

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        """Park `msg` (as delivered) with the reason."""
        ...
