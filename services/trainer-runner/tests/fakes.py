"""In-memory stand-ins for the runner's ports, shared by the use-case tests that run real trainer processes; and
`answering`, a fake storage on the test's bus for the tests that run the runner against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from visionyard.runner.ports import StagedCheckpoint
from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, responder
from visionyard.shared.commands import DatasetRef


@contextlib.asynccontextmanager
async def answering(bus: Bus, service: str, handlers: Mapping[str, Callable[..., Awaitable[Any]]]) -> AsyncIterator[None]:
    """Answer requests on each subject with its (pydantic-typed) handler in `service`'s queue group, through the
    FastStream binders as the real service does; stopped on leaving (the bus stays open: it is the test's)."""
    broker = attached(bus, service=service)
    for subject, handler in handlers.items():
        responder(broker, subject, queue=service)(handler)
    await broker.start()
    try:
        yield
    finally:
        await broker.stop()


class ListSink:
    def __init__(self) -> None:
        self.items: list[object] = []

    def emit(self, item: object) -> None:
        self.items.append(item)

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalStager:
    def __init__(self, dataset_dir: Path) -> None:
        self.dataset_dir = dataset_dir

    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        return self.dataset_dir

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        return None


class NoCancels:
    async def cancelled_attempt(self, job_id: str) -> int | None:
        return None


async def until_acked(bus: Bus) -> None:
    """Until the runner consumer has nothing pending or unacknowledged (15 s at most).

    It polls the server's view of the consumer, as shared/tests/bus/waits.py does: an ack has no push signal a
    test can subscribe to after the fact (the ack may already have gone by the time the test asks).
    """
    for _ in range(150):
        info = await bus.js.consumer_info(streams.RUNNER.stream, streams.RUNNER.durable)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the command was never acknowledged")
