"""Shared live feeds: every client of a job gets exactly what its own replay would give, however late it joins."""

from __future__ import annotations

import asyncio
import json

import pytest

from visionyard.api.live import JobFeed, LiveConnection, LiveStats
from visionyard.api.livehub import FeedHub
from visionyard.shared.bus import Bus
from visionyard.shared.events import JobCompleted, JobQueued, JobStarted, ProgressReported


def _run(job_id: str, *, epochs: int) -> list:
    events: list = [JobQueued(job_id=job_id, attempt=1), JobStarted(job_id=job_id, attempt=1, seq=1, runner_id="r1")]
    events += [ProgressReported(job_id=job_id, attempt=1, seq=1 + epoch, epoch=epoch, total_epochs=epochs,
                                metrics={"loss": 1.0 / epoch}) for epoch in range(1, epochs + 1)]
    events.append(JobCompleted(job_id=job_id, attempt=1, seq=epochs + 2, total_epochs_completed=epochs,
                               final_metrics={}, best_metrics={}, best_epoch=epochs))
    return events


async def _reference(bus: Bus, job_id: str, last_seq: int | None) -> list[dict]:
    """What a client's own replay (`JobFeed`) sends from `last_seq`."""
    got: list[dict] = []

    async def collect(message: dict) -> None:
        got.append(message)

    feed = JobFeed(bus=bus, job_id=job_id, last_seq=last_seq, send=collect)
    await feed.start()
    await _until(lambda: any(m["type"] == "training_complete" for m in got))
    await feed.stop()
    return got


class _Client:
    """A LiveConnection writing into a list, as the WebSocket endpoint wires it."""

    def __init__(self, bus: Bus, hub: FeedHub) -> None:
        self.received: list[dict] = []
        self.connection = LiveConnection(bus=bus, write=self._write, stats=LiveStats(), hub=hub,
                                         write_text=self._write_text)

    async def _write(self, message: dict) -> None:
        self.received.append(message)

    async def _write_text(self, text: str) -> None:
        self.received.append(json.loads(text))

    def done(self) -> bool:
        return any(m["type"] == "training_complete" for m in self.received)


@pytest.mark.integration
@pytest.mark.parametrize("retain", [100_000, 8])
async def test_clients_joining_at_any_point_get_a_gap_free_duplicate_free_stream(bus: Bus, retain: int) -> None:
    job_id = f"hub{retain}"
    events = _run(job_id, epochs=40)
    hub = FeedHub(bus=bus, retain=retain)
    for event in events[:10]:
        await bus.publish(event)
    early = _Client(bus, hub)
    await early.connection.subscribe(job_id, last_seq=None)
    publishing = asyncio.create_task(_publish_slowly(bus, events[10:]))
    await _until(lambda: len(early.received) >= 30)
    # Joins mid-stream from the start, and resumes after a message it already had.
    late = _Client(bus, hub)
    await late.connection.subscribe(job_id, last_seq=None)
    cut = early.received[12]["seq"]
    resumed = _Client(bus, hub)
    await resumed.connection.subscribe(job_id, last_seq=cut)
    await publishing
    await _until(lambda: early.done() and late.done() and resumed.done())
    full = await _reference(bus, job_id, None)
    assert early.received == full
    assert late.received == full
    assert resumed.received == [m for m in full if m["seq"] > cut]
    for client in (early, late, resumed):
        await client.connection.close()
    assert hub.feeds == 0  # the last client out closed the job's feed


async def _publish_slowly(bus: Bus, events: list) -> None:
    for event in events:
        await bus.publish(event)
        await asyncio.sleep(0.005)


async def _until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
