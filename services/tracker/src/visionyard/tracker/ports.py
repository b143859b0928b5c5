"""The small ports the tracker's use cases need: an MLflow-like run store, an event publisher and
a look-up of a job's last `started` event. Adapters implement them; tests swap in fakes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from visionyard.shared.events import JobStarted
from visionyard.shared.messages import Message


class RunStatus(StrEnum):
    """MLflow run statuses the tracker sets."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


@dataclass(frozen=True)
class MetricPoint:
    """One metric value at a step; `timestamp` is the producer's time in epoch milliseconds."""

    key: str
    value: float
    step: int
    timestamp: int


@dataclass(frozen=True)
class RunSnapshot:
    """What the store holds about one run; times are epoch milliseconds (MLflow's own)."""

    run_id: str
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    artifact_uri: str | None
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    latest_metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LogBatch:
    """One MLflow `log_batch` call on a run: ≤1000 metrics, ≤100 params, ≤100 tags, ≤1000 in all."""

    run_id: str
    metrics: Sequence[MetricPoint] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SetStatus:
    """A run's status change: back to RUNNING, or terminated at `end_time` (epoch ms)."""

    run_id: str
    status: RunStatus
    end_time: int | None = None


RunWrite = LogBatch | SetStatus


class RunStore(Protocol):
    """An MLflow tracking store, seen through the operations the tracker needs.

    Every method may raise when the store is unavailable; the caller retries the whole batch.
    """

    async def find_run(self, job_id: str) -> RunSnapshot | None:
        """The job's canonical run (tag `visionyard.job_id`), or None."""
        ...

    async def get_run(self, run_id: str) -> RunSnapshot | None:
        """A run by id, or None when it is gone (deleted)."""
        ...

    async def create_run(
        self, *, job_id: str, experiment_name: str, start_time: int, tags: Mapping[str, str]
    ) -> RunSnapshot:
        """Create the job's run (or return the canonical one if another writer raced us)."""
        ...

    async def write(self, writes: Sequence[RunWrite]) -> None:
        """Apply `writes` in order, in one call (one hop to the store's worker per fetched batch).

        Raises at the first write that fails; the ones before it stay applied, which is safe because
        every write is idempotent (identical points are a no-op, params keep their first value).
        """
        ...

    async def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every point of one metric, ordered by step then timestamp."""
        ...


class EventPublisher(Protocol):
    """Publishes an event durably (awaiting the PubAck), de-duplicated by its message id."""

    async def publish(self, message: Message) -> object:
        """Publish one message."""
        ...


class StartedEventLookup(Protocol):
    """Finds the newest `started` event of a job, to rebuild a run we never saw start."""

    async def last_started(self, job_id: str) -> JobStarted | None:
        """The job's last `started` event still retained, or None."""
        ...
