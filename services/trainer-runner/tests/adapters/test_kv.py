"""The runner's KV reads at a job's start wait out a JetStream that refuses them for a moment."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError

from visionyard.runner.adapters.kv import KvCancellationLedger, KvTerminalLedger, read_entry
from visionyard.shared import streams


class Flaky:
    """A bus whose buckets refuse `refusals` reads (503, as during a leader election), then answer."""

    def __init__(self, entries: dict[str, bytes], *, refusals: int) -> None:
        self.entries = entries
        self.refusals = refusals
        self.reads: list[str] = []

    async def kv(self, bucket: str) -> Any:
        return self

    async def get(self, key: str) -> Any:
        self.reads.append(key)
        if self.refusals:
            self.refusals -= 1
            raise ServiceUnavailableError()
        if key not in self.entries:
            raise KeyNotFoundError()
        return SimpleNamespace(value=self.entries[key])


async def test_a_refused_read_is_tried_again_instead_of_failing_the_jobs_start() -> None:
    bus = Flaky({"7": b'{"attempt": 2}'}, refusals=2)
    assert await KvTerminalLedger(bus).terminal_attempt("7") == 2  # type: ignore[arg-type]
    assert bus.reads == ["7", "7", "7"]
    assert await KvCancellationLedger(bus).cancelled_attempt("8") is None  # type: ignore[arg-type]


async def test_a_jetstream_that_stays_away_fails_the_read() -> None:
    bus = Flaky({}, refusals=1_000)
    with pytest.raises(ServiceUnavailableError):
        await read_entry(bus, streams.KV_JOB_TERMINAL, "7", within=0.5)  # type: ignore[arg-type]
    assert 2 <= len(bus.reads) < 10
