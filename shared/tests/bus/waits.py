"""Bounded waits on state the bus tests observe: a condition of the test's own, or the server's view of a
consumer. Each polls what it waits on (neither has a push signal) and fails the test instead of hanging it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.js import api

from visionyard.shared import streams
from visionyard.shared.bus import Bus


async def until(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def until_consumer(
    bus: Bus, spec: streams.ConsumerSpec, ready: Callable[[api.ConsumerInfo], bool], *, timeout: float = 30.0
) -> None:
    """Until the server's view of `spec`'s consumer satisfies `ready`."""
    deadline = time.monotonic() + timeout
    while not ready(await bus.js.consumer_info(spec.stream, spec.durable)):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
