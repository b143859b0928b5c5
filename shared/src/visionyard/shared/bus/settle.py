"""Settling a delivered message by its handler's outcome: the one implementation every consumer uses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.errors import NotJSMessageError

from visionyard.shared import metrics, streams
from visionyard.shared.bus.errors import AckAction, AckDecision, decide_ack

log = logging.getLogger("visionyard.bus")


class DeliveryMetadata(Protocol):
    """What a delivered JetStream message says about its deliveries."""

    @property
    def num_delivered(self) -> int:
        """How many times the message has been delivered, this delivery included."""
        ...

    @property
    def num_pending(self) -> int:
        """How many messages the consumer still has to deliver after this one."""
        ...


class Delivered(Protocol):
    """A delivered JetStream message, as far as holding and settling it needs (nats-py's `Msg` is one)."""

    @property
    def subject(self) -> str:
        """The subject it was published on."""
        ...

    @property
    def data(self) -> bytes:
        """Its payload."""
        ...

    @property
    def metadata(self) -> DeliveryMetadata:
        """Its delivery count (and more)."""
        ...

    async def in_progress(self) -> None:
        """Reset the redelivery timer."""
        ...

    async def ack(self) -> None:
        """Done: never redeliver."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Redeliver, after `delay` seconds if given."""
        ...

    async def term(self) -> None:
        """Never redeliver, and do not count it done."""
        ...


DeadLetter = Callable[..., Awaitable[None]]
"""`Bus.dead_letter(msg, *, consumer, reason)`: parks a poison message before it is terminated."""


class DeadLetters(Protocol):
    """Where a poison message is parked with its reason."""

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        """Park `msg` (a `Delivered`; typed Any so `Bus.dead_letter`, which takes nats-py's `Msg`, is one)."""
        ...


async def settle(
    msg: Delivered, spec: streams.ConsumerSpec, error: BaseException | None, *,
    dead_letter: DeadLetter | None, delivered: int | None = None,
) -> AckDecision:
    """Ack, nak with backoff, or dead-letter and terminate `msg`, as `decide_ack` says; the decision taken.

    A failed dead-letter skips the term: the message comes back after the ack wait and is parked then.
    """
    if delivered is None:
        # Only a failure's decision depends on the delivery count: parsing it from every acked
        # message's reply subject was a visible share of a busy consumer's time (profiled).
        delivered = delivery_count(msg) if error is not None else 1
    decision = decide_ack(error, delivered=delivered, spec=spec)
    if error is not None:
        metrics.HANDLER_FAILURES.labels(spec.durable, decision.action.value).inc()
        log.warning("handler failed: %s -> %s", error, decision.action,
                    extra={"subject": msg.subject, "delivery": delivered, "consumer": spec.durable})
    try:
        if decision.dead_letter and dead_letter is not None:
            await dead_letter(msg, consumer=spec.durable, reason=str(error))
        if decision.action is AckAction.ACK:
            await msg.ack()
        elif decision.action is AckAction.TERM:
            await msg.term()
        else:
            await msg.nak(delay=decision.delay)
    except Exception as settle_error:  # the broker will redeliver after ack_wait
        log.warning("could not settle %s: %s", msg.subject, settle_error)
    return decision


def mark_settled(msg: Delivered) -> None:
    """Have `msg` count as settled without telling the server anything.

    For a delivery that is no longer ours (`HeldMessage.leave`): whatever settles what a handler left
    unsettled (the `Settle` middleware) must leave it alone too. nats-py's own flag, which its acks set.
    """
    if hasattr(msg, "_ackd"):
        msg._ackd = True


def delivery_count(msg: Delivered) -> int:
    """This delivery's number (1 for the first, and for a message delivered without JetStream)."""
    try:
        metadata = msg.metadata
    except Exception:  # not a JetStream delivery (TestNatsBroker's): its first
        return 1
    return (metadata.num_delivered if metadata is not None else 1) or 1


async def reject(dead_letters: DeadLetters, msg: Delivered, *, consumer: str, reason: str) -> None:
    """Dead-letter one poison message of a batch and terminate it; the batch's others go on."""
    log.warning("dead-lettering a message: %s", reason, extra={"subject": msg.subject, "delivery": delivery_count(msg)})
    await dead_letters.dead_letter(msg, consumer=consumer, reason=reason)
    try:
        await msg.term()
    except NotJSMessageError:  # delivered without JetStream (TestNatsBroker): nothing to terminate
        pass
