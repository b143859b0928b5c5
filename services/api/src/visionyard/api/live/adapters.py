"""The live feed's NATS side: one ordered JetStream consumer over a job's events, from the first one.

The only module of the live package that imports nats-py: the feed sees each event as its subject,
payload and EVENTS stream sequence (`JobEvents`), so it can be read and tested without a broker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js import api

from visionyard.shared import subjects
from visionyard.shared.bus import Bus

# Called with an event's subject, payload and EVENTS stream sequence, in stream order.
OnJobEvent = Callable[[str, bytes, int], Awaitable[None]]


class JobEventsSubscription:
    """An open ordered consumer; `stop` closes it (and tolerates a connection already gone)."""

    def __init__(self, subscription: Any) -> None:
        self._subscription = subscription

    async def stop(self) -> None:
        """Unsubscribe."""
        with contextlib.suppress(Exception):  # the connection may already be gone
            await self._subscription.unsubscribe()


async def subscribe_job_events(bus: Bus, job_id: str, on_event: OnJobEvent) -> JobEventsSubscription:
    """Open an ordered consumer over every event of `job_id` (replay from the first, then live).

    Ordered, so the stream sequence a client resumes from is never skipped or repeated, and
    the feed works the same behind any number of API replicas.
    """

    async def deliver(msg: Msg) -> None:
        await on_event(msg.subject, msg.data, msg.metadata.sequence.stream)

    subscription = await bus.js.subscribe(
        subjects.job_events(job_id), cb=deliver, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
    )
    return JobEventsSubscription(subscription)
