"""Fixtures of the tracker tests: in-memory fakes of its ports, with MLflow's observable semantics."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from visionyard.shared.events import JobStarted
from visionyard.shared.messages import Message
from visionyard.tracker.ports import LogBatch, MetricPoint, RunSnapshot, RunWrite, SetStatus

_ids = itertools.count(1)


@dataclass
class FakeRun:
    run_id: str
    experiment_id: str
    experiment_name: str
    start_time: int
    status: str = "RUNNING"
    end_time: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: list[MetricPoint] = field(default_factory=list)

    def snapshot(self) -> RunSnapshot:
        latest: dict[str, MetricPoint] = {}
        for p in self.points:
            if p.key not in latest or (p.step, p.timestamp) >= (latest[p.key].step, latest[p.key].timestamp):
                latest[p.key] = p
        return RunSnapshot(
            run_id=self.run_id,
            experiment_id=self.experiment_id,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            artifact_uri=f"memory://{self.run_id}",
            params=dict(self.params),
            tags=dict(self.tags),
            latest_metrics={k: p.value for k, p in latest.items()},
        )


class FakeRunStore:
    """A `RunStore` in memory; `fail_next` makes the next N calls raise like an unreachable store."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.experiments: dict[str, str] = {}
        self.metric_batches: list[tuple[str, int]] = []
        self.log_batch_calls: list[LogBatch] = []
        self.status_changes: list[tuple[str, str, int]] = []
        self.write_calls = 0
        self.fail_next = 0
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("mlflow unavailable")

    def runs_of(self, job_id: str) -> list[FakeRun]:
        return [r for r in self.runs.values() if r.tags.get("visionyard.job_id") == job_id]

    async def find_run(self, job_id: str) -> RunSnapshot | None:
        self._maybe_fail()
        runs = self.runs_of(job_id)
        return min(runs, key=lambda r: (r.start_time, r.run_id)).snapshot() if runs else None

    async def get_run(self, run_id: str) -> RunSnapshot | None:
        self._maybe_fail()
        run = self.runs.get(run_id)
        return run.snapshot() if run else None

    async def create_run(
        self, *, job_id: str, experiment_name: str, start_time: int, tags: Mapping[str, str]
    ) -> RunSnapshot:
        self._maybe_fail()
        experiment_id = self.experiments.setdefault(experiment_name, str(len(self.experiments) + 1))
        run = FakeRun(f"run{next(_ids)}", experiment_id, experiment_name, start_time, tags=dict(tags))
        self.runs[run.run_id] = run
        return run.snapshot()

    async def write(self, writes: Sequence[RunWrite]) -> None:
        self.write_calls += 1
        for write in writes:
            self._maybe_fail()
            if isinstance(write, LogBatch):
                self._log_batch(write)
            else:
                self._set_status(write)

    def _log_batch(self, batch: LogBatch) -> None:
        metrics, params, tags = batch.metrics, batch.params, batch.tags
        # MLflow's limits: 1000 metrics, 100 params, 100 tags, 1000 entities in all per call.
        assert len(metrics) <= 1000 and len(params) <= 100 and len(tags) <= 100
        assert len(metrics) + len(params) + len(tags) <= 1000
        run = self.runs[batch.run_id]
        for key, value in params.items():
            if key in run.params and run.params[key] != value:
                raise ValueError(f"param {key} changed")  # MLflow's INVALID_PARAMETER_VALUE
            run.params[key] = value
        run.tags.update(tags)
        self.log_batch_calls.append(batch)
        if metrics:
            self.metric_batches.append((batch.run_id, len(metrics)))
        for point in metrics:
            if point not in run.points:  # MLflow's SQL store: identical points are a no-op
                run.points.append(point)

    def _set_status(self, change: SetStatus) -> None:
        run = self.runs[change.run_id]
        # MLflow's own order of events: a status never lands before the points sent ahead of it.
        self.status_changes.append((change.run_id, str(change.status), len(run.points)))
        run.status = str(change.status)
        if change.end_time is not None:
            run.end_time = change.end_time

    async def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        self._maybe_fail()
        points = [p for p in self.runs[run_id].points if p.key == key]
        return sorted(points, key=lambda p: (p.step, p.timestamp))


class FakePublisher:
    """Records published messages, de-duplicated by message id like JetStream."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}

    async def publish(self, message: Message) -> object:
        self.messages.setdefault(message.message_id, message)
        return None


class FakeStartedEvents:
    """A retained-events look-up over a list of started events."""

    def __init__(self, events: Sequence[JobStarted] = ()) -> None:
        self.events = list(events)

    async def last_started(self, job_id: str) -> JobStarted | None:
        matching = [e for e in self.events if e.job_id == job_id]
        return matching[-1] if matching else None


@pytest.fixture
def fake_store() -> FakeRunStore:
    """An empty in-memory run store."""
    return FakeRunStore()


@pytest.fixture
def fake_publisher() -> FakePublisher:
    """A publisher that records what it was given."""
    return FakePublisher()


@pytest.fixture
def retained_started() -> type[FakeStartedEvents]:
    """Build a look-up of retained `started` events."""
    return FakeStartedEvents
