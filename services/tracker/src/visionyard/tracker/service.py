"""The tracker's use cases: mirror job events into one MLflow run per job, and read runs back.

Idempotency comes from three facts: a job's run is found again by its `visionyard.job_id` tag (so a
restart never creates a second run), params already present are never re-logged, and every metric
point carries the producer's step and timestamp (so re-logging a redelivered event writes nothing new).
Fencing: events of an attempt older than the newest one seen (kept as the run tag
`visionyard.attempt`, so it survives restarts) are ignored.

Writes of a fetched batch are gathered per run and go to the store in one call at the end of the
batch (packed into as few `log_batch` calls as MLflow's limits allow, each run's status last); the
bus acks the batch only after that call returns, so a crash before it only means a redelivery.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from visionyard.shared.events import (
    ArtifactStored,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobStarted,
    JobTracked,
    ProgressReported,
)
from visionyard.shared.logs import bind
from visionyard.tracker.ports import (
    EventPublisher,
    LogBatch,
    MetricPoint,
    RunSnapshot,
    RunStatus,
    RunStore,
    RunWrite,
    SetStatus,
    StartedEventLookup,
)

log = logging.getLogger("visionyard.tracker")

# MLflow's log_batch limits: 1000 metrics, 100 params, 100 tags per call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
# MLflow rejects longer keys/values; truncating keeps one odd value from poisoning a whole batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

TAG_JOB_ID = "visionyard.job_id"
TAG_ATTEMPT = "visionyard.attempt"
TAG_PROJECT = "visionyard.project_id"
TAG_RUNNER = "visionyard.runner_id"
TAG_TRACKED = "visionyard.tracked"
TAG_FAILURE_REASON = "visionyard.failure_reason"
TAG_FAILURE_MESSAGE = "visionyard.failure_message"
BEST_PREFIX = "best_"
DEFAULT_EXPERIMENT = "visionyard-default"

# The only event kinds the tracker acts on; everything else on evt.job.> is acked untouched.
TRACKED_KINDS: frozenset[str] = frozenset(
    cls.kind for cls in (JobStarted, ProgressReported, JobCompleted, JobFailed, JobCancelled, ArtifactStored)
)
TERMINAL_STATUS: dict[type[JobEvent], RunStatus] = {
    JobCompleted: RunStatus.FINISHED,
    JobFailed: RunStatus.FAILED,
    JobCancelled: RunStatus.KILLED,
}

_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. /]")
# Job ids are subject tokens; anything else cannot be looked up safely in an MLflow filter string.
_JOB_ID = re.compile(r"^[\w\-:]{1,200}$")


# -- pure helpers of the use cases (unit-tested directly) ------------------------------------------


def epoch_millis(moment: datetime) -> int:
    """An aware datetime as epoch milliseconds (MLflow's time unit)."""
    return int(moment.timestamp() * 1000)


def is_valid_job_id(job_id: str) -> bool:
    """Whether a job id is a plain token (letters, digits, `_-:`), safe to look a run up by."""
    return bool(_JOB_ID.match(job_id))


@lru_cache(maxsize=4096)  # metric keys repeat on every event of a job
def safe_key(key: str) -> str:
    """A metric/param/tag key MLflow accepts (alphanumerics, `_-. /`), at most 250 characters."""
    cleaned = _UNSAFE_KEY_CHARS.sub("_", key).strip() or "_"
    return cleaned[:MAX_KEY_LENGTH]


def progress_points(event: ProgressReported) -> list[MetricPoint]:
    """The metric points of one progress event, at the producer's step and timestamp."""
    step = event.step if event.step is not None else event.epoch
    timestamp = epoch_millis(event.occurred_at)
    return [
        MetricPoint(key=safe_key(key), value=float(value), step=step, timestamp=timestamp)
        for key, value in event.metrics.items()
    ]


def best_points(event: JobCompleted) -> list[MetricPoint]:
    """The trainer's best metrics as `best_<key>` points at the best epoch."""
    step = event.best_epoch if event.best_epoch is not None else event.total_epochs_completed
    timestamp = epoch_millis(event.occurred_at)
    return [
        MetricPoint(key=safe_key(BEST_PREFIX + key), value=float(value), step=step, timestamp=timestamp)
        for key, value in event.best_metrics.items()
    ]


def unique_points(points: Iterable[MetricPoint]) -> list[MetricPoint]:
    """Drop repeated identical points (a redelivery inside one batch), keeping first-seen order."""
    seen: set[tuple[str, float | str, int, int]] = set()
    kept: list[MetricPoint] = []
    for point in points:
        # NaN != NaN, so identify NaNs by a marker rather than by value.
        identity = (point.key, "nan" if math.isnan(point.value) else point.value, point.step, point.timestamp)
        if identity not in seen:
            seen.add(identity)
            kept.append(point)
    return kept


def log_batches(
    run_id: str, *, metrics: Sequence[MetricPoint], params: Mapping[str, str], tags: Mapping[str, str]
) -> list[LogBatch]:
    """A run's writes packed into as few `log_batch` calls as MLflow's limits allow.

    Params and tags ride in the first calls beside metrics: each call costs MLflow a few
    transactions whatever its size, so filling calls (≤1000 entities) is what keeps it cheap.
    """
    param_items = list(params.items())
    tag_items = list(tags.items())
    batches: list[LogBatch] = []
    next_metric = next_param = next_tag = 0
    while next_metric < len(metrics) or next_param < len(param_items) or next_tag < len(tag_items):
        chunk_params = param_items[next_param : next_param + MAX_PARAMS_PER_BATCH]
        chunk_tags = tag_items[next_tag : next_tag + MAX_TAGS_PER_BATCH]
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(chunk_params) - len(chunk_tags))
        chunk_metrics = metrics[next_metric : next_metric + room]
        next_metric += len(chunk_metrics)
        next_param += len(chunk_params)
        next_tag += len(chunk_tags)
        batches.append(LogBatch(run_id, metrics=chunk_metrics, params=dict(chunk_params), tags=dict(chunk_tags)))
    return batches


def is_lower_better(key: str) -> bool:
    """Whether smaller values of a metric are better: keys naming a loss are minimised."""
    return "loss" in key.lower()


def best_values(history: Mapping[str, Sequence[MetricPoint]]) -> dict[str, float]:
    """Best value of each metric over its history (min for losses, max otherwise), NaNs ignored."""
    best: dict[str, float] = {}
    for key, points in history.items():
        values = [p.value for p in points if not math.isnan(p.value)]
        if values:
            best[key] = min(values) if is_lower_better(key) else max(values)
    return best


def json_number(value: float) -> float | None:
    """A metric value JSON can carry: NaN and infinities become null."""
    return value if math.isfinite(value) else None


def run_params(event: JobStarted) -> dict[str, str]:
    """The params a started job logs: its config plus the pinned dataset and where it belongs."""
    params: dict[str, Any] = dict(event.params)
    if event.dataset_hash:
        params.setdefault("dataset_hash", event.dataset_hash)
    if event.project_id:
        params.setdefault("project_id", event.project_id)
    return {safe_key(key): _param_value(value) for key, value in params.items()}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_VALUE_LENGTH]


def experiment_name_for(event: JobStarted | None, *, prefix: str) -> str:
    """The experiment of a job: its experiment name, else one experiment per project."""
    if event is not None and event.experiment_name:
        name = event.experiment_name
    elif event is not None and event.project_id:
        name = f"visionyard-{event.project_id}"
    else:
        name = DEFAULT_EXPERIMENT
    return f"{prefix}{name}"


def _attempt_tag(tags: Mapping[str, str]) -> int:
    try:
        return int(tags.get(TAG_ATTEMPT, "0"))
    except ValueError:
        return 0


# -- the use cases ---------------------------------------------------------------------------------


@dataclass
class RunState:
    """What the tracker remembers about a job's run between events (rebuilt from the store)."""

    run_id: str
    experiment_id: str
    attempt: int
    status: str
    param_keys: set[str] = field(default_factory=set)
    tracked: bool = False

    @classmethod
    def of(cls, snapshot: RunSnapshot) -> RunState:
        """The state a stored run implies."""
        return cls(
            run_id=snapshot.run_id,
            experiment_id=snapshot.experiment_id,
            attempt=_attempt_tag(snapshot.tags),
            status=snapshot.status,
            param_keys=set(snapshot.params),
            tracked=snapshot.tags.get(TAG_TRACKED) == "true",
        )


@dataclass
class PendingRunWrites:
    """What one batch of events will write to one run, in the order it must land."""

    metrics: list[MetricPoint] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # The run's last status change in the batch; written after the run's points, so a reader never
    # sees a finished run missing them.
    status: SetStatus | None = None

    def writes(self, run_id: str) -> list[RunWrite]:
        """The store writes, status last."""
        writes: list[RunWrite] = list(
            log_batches(run_id, metrics=unique_points(self.metrics), params=self.params, tags=self.tags)
        )
        if self.status is not None:
            writes.append(self.status)
        return writes


class PendingWrites:
    """The writes of one batch of events, gathered per run (first-touched order)."""

    def __init__(self) -> None:
        self._runs: dict[str, PendingRunWrites] = {}

    def of(self, run_id: str) -> PendingRunWrites:
        """The pending writes of one run."""
        pending = self._runs.get(run_id)
        if pending is None:
            pending = self._runs[run_id] = PendingRunWrites()
        return pending

    def writes(self) -> list[RunWrite]:
        """Every pending write, run by run."""
        return [write for run_id, pending in self._runs.items() for write in pending.writes(run_id)]


class Tracker:
    """Mirrors job events into MLflow runs and reads them back for the API."""

    def __init__(
        self,
        *,
        store: RunStore,
        publisher: EventPublisher,
        started_events: StartedEventLookup | None = None,
        experiment_prefix: str = "",
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._started_events = started_events
        self._prefix = experiment_prefix
        # job_id -> run state; a cache only: the store's tags are the truth after a restart.
        self._runs: dict[str, RunState] = {}

    # -- writing ---------------------------------------------------------------------------------

    async def record_events(self, events: Sequence[JobEvent]) -> None:
        """Apply a batch of job events in stream order, then write it to the store in one call.

        Raises when the store fails; the caller redelivers the whole batch, which is safe because
        every step is idempotent.
        """
        pending = PendingWrites()
        try:
            for event in events:
                if event.kind in TRACKED_KINDS:
                    await self._apply(event, pending)
            writes = pending.writes()
            if writes:
                await self._store.write(writes)
        except Exception:
            # The cache may now disagree with the store (a half-applied batch, a run deleted
            # behind our back): forget it so the retry re-reads the truth.
            self._runs.clear()
            raise

    async def _apply(self, event: JobEvent, pending: PendingWrites) -> None:
        context = bind(log, job_id=event.job_id, attempt=event.attempt, seq=event.seq)
        if isinstance(event, JobStarted):
            await self._start(event, pending)
            return
        state = await self._run_for(event, pending)
        if self._fence_stale_attempt(state, event):
            context.info("ignoring %s of stale attempt (newest is %d)", event.kind, state.attempt)
            return
        run = pending.of(state.run_id)
        self._advance_attempt(state, event.attempt, run)
        if isinstance(event, ProgressReported):
            run.metrics.extend(progress_points(event))
        elif isinstance(event, ArtifactStored):
            run.tags[safe_key(f"checkpoint.{event.checkpoint_kind}")] = event.uri[:MAX_TAG_VALUE_LENGTH]
        elif isinstance(event, (JobCompleted, JobFailed, JobCancelled)):
            self._terminate(state, event, run)

    async def _start(self, event: JobStarted, pending: PendingWrites) -> RunState:
        state = await self._known_run(event.job_id)
        if state is None:
            state = await self._create_run(event)
        if self._fence_stale_attempt(state, event):
            bind(log, job_id=event.job_id, attempt=event.attempt).info(
                "ignoring started of stale attempt (newest is %d)", state.attempt
            )
            return state
        run = pending.of(state.run_id)
        self._advance_attempt(state, event.attempt, run)
        self._queue_new_params(state, run_params(event), run)
        if not state.tracked:
            await self._publisher.publish(
                JobTracked(
                    job_id=event.job_id,
                    attempt=event.attempt,
                    run_id=state.run_id,
                    experiment_id=state.experiment_id,
                    # Deterministic, so a redelivered `started` is de-duplicated by JetStream.
                    message_id=f"tracked-{event.job_id}-{state.run_id}",
                )
            )
            # Written after the publish (with the batch): a crash in between re-publishes the same
            # message id.
            run.tags[TAG_TRACKED] = "true"
            state.tracked = True
        return state

    def _terminate(
        self, state: RunState, event: JobCompleted | JobFailed | JobCancelled, run: PendingRunWrites
    ) -> None:
        if isinstance(event, JobCompleted):
            run.metrics.extend(best_points(event))
        elif isinstance(event, JobFailed):
            run.tags[TAG_FAILURE_REASON] = str(event.reason)
            run.tags[TAG_FAILURE_MESSAGE] = event.error_message[:MAX_TAG_VALUE_LENGTH]
        status = TERMINAL_STATUS[type(event)]
        run.status = SetStatus(state.run_id, status, end_time=epoch_millis(event.occurred_at))
        state.status = status

    def _queue_new_params(self, state: RunState, params: Mapping[str, str], run: PendingRunWrites) -> None:
        # MLflow params are immutable: a key already present (or queued) keeps its first value.
        for key, value in params.items():
            if key not in state.param_keys:
                run.params[key] = value
                state.param_keys.add(key)

    def _fence_stale_attempt(self, state: RunState, event: JobEvent) -> bool:
        """Whether `event` belongs to an attempt older than the newest seen for its job."""
        return event.attempt < state.attempt

    def _advance_attempt(self, state: RunState, attempt: int, run: PendingRunWrites) -> None:
        if attempt <= state.attempt:
            return
        run.tags[TAG_ATTEMPT] = str(attempt)
        # A new attempt of a job whose run already ended (restart, resume, failover) runs again.
        if state.status != RunStatus.RUNNING:
            run.status = SetStatus(state.run_id, RunStatus.RUNNING)
            state.status = RunStatus.RUNNING
        state.attempt = attempt

    async def _known_run(self, job_id: str) -> RunState | None:
        state = self._runs.get(job_id)
        if state is None:
            snapshot = await self._store.find_run(job_id)
            if snapshot is not None:
                state = self._runs[job_id] = RunState.of(snapshot)
        return state

    async def _run_for(self, event: JobEvent, pending: PendingWrites) -> RunState:
        """The job's run; created (from its `started` event if still retained) when missing."""
        state = await self._known_run(event.job_id)
        if state is not None:
            return state
        started = await self._started_events.last_started(event.job_id) if self._started_events else None
        if started is not None:
            bind(log, job_id=event.job_id).info("rebuilding run from the retained started event")
            return await self._start(started, pending)
        return await self._create_run(event)

    async def _create_run(self, event: JobEvent) -> RunState:
        started = event if isinstance(event, JobStarted) else None
        tags = {TAG_JOB_ID: event.job_id, TAG_ATTEMPT: str(event.attempt)}
        if started is not None and started.project_id:
            tags[TAG_PROJECT] = started.project_id
        if started is not None:
            tags[TAG_RUNNER] = started.runner_id
        snapshot = await self._store.create_run(
            job_id=event.job_id,
            experiment_name=experiment_name_for(started, prefix=self._prefix),
            start_time=epoch_millis(event.occurred_at),
            tags=tags,
        )
        state = self._runs[event.job_id] = RunState.of(snapshot)
        bind(log, job_id=event.job_id, attempt=event.attempt).info("created run %s", state.run_id)
        return state

    # -- reading ---------------------------------------------------------------------------------

    async def _snapshot(self, job_id: str) -> RunSnapshot | None:
        if not is_valid_job_id(job_id):
            return None
        cached = self._runs.get(job_id)
        if cached is not None:
            snapshot = await self._store.get_run(cached.run_id)
            if snapshot is not None:
                return snapshot
        return await self._store.find_run(job_id)

    async def _history(self, snapshot: RunSnapshot) -> dict[str, list[MetricPoint]]:
        return {key: await self._store.metric_history(snapshot.run_id, key) for key in sorted(snapshot.latest_metrics)}

    async def metrics_of(self, job_id: str) -> dict[str, Any]:
        """Full metric history of a job's run (times in epoch ms), or `found: false`."""
        snapshot = await self._snapshot(job_id)
        if snapshot is None:
            return {"found": False, "run_id": None, "status": None, "metrics": {}, "params": {},
                    "start_time": None, "end_time": None}
        history = await self._history(snapshot)
        return {
            "found": True,
            "run_id": snapshot.run_id,
            "status": snapshot.status,
            "metrics": {
                key: [{"step": p.step, "value": json_number(p.value), "timestamp": p.timestamp} for p in points]
                for key, points in history.items()
            },
            "params": dict(snapshot.params),
            "start_time": snapshot.start_time,
            "end_time": snapshot.end_time,
        }

    async def summary_of(self, job_id: str) -> dict[str, Any]:
        """Latest and best metrics of a job's run (times in epoch ms), or `found: false`."""
        snapshot = await self._snapshot(job_id)
        if snapshot is None:
            return {"found": False, "run_id": None, "status": None, "latest_metrics": {}, "params": {},
                    "best_metrics": {}, "start_time": None, "end_time": None, "artifact_uri": None}
        history = await self._history(snapshot)
        # `best_<key>` points are already bests the trainer chose; rank only the raw series.
        raw = {key: points for key, points in history.items() if not key.startswith(BEST_PREFIX)}
        return {
            "found": True,
            "run_id": snapshot.run_id,
            "status": snapshot.status,
            "latest_metrics": {key: json_number(value) for key, value in snapshot.latest_metrics.items()},
            "params": dict(snapshot.params),
            "best_metrics": best_values(raw),
            "start_time": snapshot.start_time,
            "end_time": snapshot.end_time,
            "artifact_uri": snapshot.artifact_uri,
        }
