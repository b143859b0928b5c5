"""The run store on MLflow (`MlflowClient`): the only module that imports MLflow.

All MLflow calls run on ONE worker thread: MLflow's client is blocking, and serialising the calls
keeps the SQLite store to a single writer ("database is locked" otherwise) while the event loop
keeps serving requests.

Concurrent run creation (several tracker replicas against an MLflow server, events of one job
landing on two replicas) can race: both may create a run. Each creator re-reads the job's runs right
after creating its own, and every reader picks the same canonical run (earliest start_time, then
smallest run_id); a creator whose run lost deletes it. The window is narrowed, not closed: points a
loser logged before its deletion are not copied over.

A job's run is looked up (on a cache miss of the tracker: once per job and process) across the
experiment ids listed once and kept; only a miss lists the experiments again, since a run can only
hide in an experiment created since the last listing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.entities import RunStatus as MlflowRunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from prometheus_client import Histogram

from visionyard.shared.metrics import LATENCY_BUCKETS
from visionyard.tracker.ports import LogBatch, MetricPoint, RunSnapshot, RunStatus, RunWrite
from visionyard.tracker.service import TAG_JOB_ID, is_valid_job_id

T = TypeVar("T")

MLFLOW_SECONDS = Histogram(
    "visionyard_tracker_mlflow_seconds", "Time of the tracker's MLflow calls, by store operation",
    ["operation"], buckets=LATENCY_BUCKETS,
)


class MlflowRunStore:
    """`RunStore` over an MLflow tracking URI (SQLite file or tracking server)."""

    def __init__(self, *, tracking_uri: str, artifact_root: str | None = None, single_writer: bool = False) -> None:
        self._tracking_uri = tracking_uri
        self._artifact_root = artifact_root
        # The only tracker writing this store (the SQLite default: one writer, one replica). No other
        # writer can create an experiment or a job's run, so a miss is final and a run we create is the
        # job's run: a new job costs two searches fewer (profiled: most of ~45 ms of CPU per job).
        self._single_writer = single_writer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._client: MlflowClient | None = None
        self._experiments: dict[str, str] = {}  # name -> id
        self._experiment_ids: dict[str, None] | None = None  # the active ones, insertion-ordered

    async def open(self) -> None:
        """Open (and migrate) the store now rather than on the first batch; raises if unreachable."""

        def open_store() -> None:
            self._known_experiment_ids()  # opens the client, then lists the experiments once

        await self._call(open_store, operation="open")

    def close(self) -> None:
        """Stop the worker thread (after in-flight calls finish)."""
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T], *, operation: str) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, operation)

    @staticmethod
    def _timed(fn: Callable[[], T], operation: str) -> T:
        # Timed on the worker thread, so the time a call queued behind another is not counted as MLflow's.
        started = time.perf_counter()
        try:
            return fn()
        finally:
            MLFLOW_SECONDS.labels(operation).observe(time.perf_counter() - started)

    def _mlflow(self) -> MlflowClient:
        # Created lazily on the worker thread: opening the store may fail (server down, disk
        # unavailable); failing here fails the batch, which is retried, instead of the process.
        if self._client is None:
            if self._tracking_uri.startswith("sqlite:///"):
                Path(self._tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self._tracking_uri)
            client.search_experiments(max_results=1)  # open (and migrate) the store now
            self._client = client
        return self._client

    # -- RunStore ---------------------------------------------------------------------------------

    async def find_run(self, job_id: str) -> RunSnapshot | None:
        """The job's canonical run, or None."""
        return await self._call(lambda: self._find(job_id), operation="find_run")

    async def get_run(self, run_id: str) -> RunSnapshot | None:
        """A run by id, or None when missing or deleted."""

        def get() -> RunSnapshot | None:
            try:
                run = self._mlflow().get_run(run_id)
            except MlflowException as error:
                if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    return None
                raise
            return None if run.info.lifecycle_stage == "deleted" else _snapshot(run)

        return await self._call(get, operation="get_run")

    async def create_run(
        self, *, job_id: str, experiment_name: str, start_time: int, tags: Mapping[str, str]
    ) -> RunSnapshot:
        """Create the job's run, then settle on the canonical one should a concurrent writer race us."""

        def create() -> RunSnapshot:
            client = self._mlflow()
            experiment_id = self._experiment_id(experiment_name)
            try:
                run = client.create_run(experiment_id, start_time=start_time, tags=dict(tags), run_name=job_id)
            except MlflowException:
                # E.g. the experiment was deleted since we cached its id: resolve (restore) it again
                # on the retry.
                self._experiments.pop(experiment_name, None)
                raise
            if self._single_writer:
                return _snapshot(run)
            canonical = self._find(job_id)
            if canonical is None:  # pragma: no cover - our own run is always visible to us
                return _snapshot(run)
            if canonical.run_id != run.info.run_id:
                client.delete_run(run.info.run_id)
            return canonical

        return await self._call(create, operation="create_run")

    async def write(self, writes: Sequence[RunWrite]) -> None:
        """Apply the writes in order on the worker thread: one hop for a whole batch of events."""

        def apply() -> None:
            client = self._mlflow()
            for write in writes:
                if isinstance(write, LogBatch):
                    # Newest first: MLflow's SQL store rewrites a key's "latest" row for every point
                    # newer than the one before it in the call (every point, in stream order);
                    # newest first, only a key's first point does. Stored points are the same.
                    newest_first = sorted(write.metrics, key=lambda p: (p.step, p.timestamp), reverse=True)
                    client.log_batch(
                        write.run_id,
                        metrics=[Metric(p.key, p.value, p.timestamp, p.step) for p in newest_first],
                        params=[Param(key, value) for key, value in write.params.items()],
                        tags=[RunTag(key, value) for key, value in write.tags.items()],
                        synchronous=True,
                    )
                elif write.status is RunStatus.RUNNING:
                    client.update_run(write.run_id, status=MlflowRunStatus.to_string(MlflowRunStatus.RUNNING))
                else:
                    client.set_terminated(write.run_id, status=str(write.status), end_time=write.end_time)

        await self._call(apply, operation="write")

    async def metric_history(self, run_id: str, key: str) -> list[MetricPoint]:
        """Every point of one metric, ordered by step then timestamp."""

        def history() -> list[MetricPoint]:
            points = [
                MetricPoint(key=m.key, value=float(m.value), step=int(m.step), timestamp=int(m.timestamp))
                for m in self._mlflow().get_metric_history(run_id, key)
            ]
            return sorted(points, key=lambda p: (p.step, p.timestamp))

        return await self._call(history, operation="metric_history")

    # -- on the worker thread ---------------------------------------------------------------------

    def _find(self, job_id: str) -> RunSnapshot | None:
        if not is_valid_job_id(job_id):
            # It is spliced into a filter string; the handlers reject such ids before they get here.
            raise ValueError(f"job id {job_id!r} is not a valid token")
        runs = self._job_runs(job_id, list(self._known_experiment_ids()))
        if not runs and not self._single_writer:
            # Before answering "no run": the run may sit in an experiment created since we last
            # listed them (by another replica); a miss is once per job, so list them again.
            runs = self._job_runs(job_id, self._list_new_experiment_ids())
        if not runs:
            return None
        canonical = min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        return _snapshot(canonical)

    def _job_runs(self, job_id: str, experiment_ids: list[str]) -> list[Run]:
        if not experiment_ids:
            return []
        client = self._mlflow()
        runs: list[Run] = []
        page_token: str | None = None
        while True:
            page = client.search_runs(
                experiment_ids,
                filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=100,
                page_token=page_token,
            )
            runs.extend(page)
            page_token = page.token
            if not page_token:
                return runs

    def _known_experiment_ids(self) -> dict[str, None]:
        # Listing every experiment on each look-up cost a query per look-up; the active ones only
        # change when a tracker creates one (a deleted experiment's runs are deleted with it).
        if self._experiment_ids is None:
            self._experiment_ids = dict.fromkeys(self._list_experiment_ids())
        return self._experiment_ids

    def _list_new_experiment_ids(self) -> list[str]:
        known = self._known_experiment_ids()
        fresh = [experiment_id for experiment_id in self._list_experiment_ids() if experiment_id not in known]
        known.update(dict.fromkeys(fresh))
        return fresh

    def _list_experiment_ids(self) -> list[str]:
        client = self._mlflow()
        ids: list[str] = []
        page_token: str | None = None
        while True:
            page = client.search_experiments(
                view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=page_token
            )
            ids.extend(e.experiment_id for e in page)
            page_token = page.token
            if not page_token:
                return ids

    def _experiment_id(self, name: str) -> str:
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        client = self._mlflow()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name, artifact_location=self._artifact_location(name))
            except MlflowException as error:
                # Another replica created it first: use theirs.
                if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        self._experiments[name] = experiment_id
        self._known_experiment_ids()[experiment_id] = None
        return experiment_id

    def _artifact_location(self, experiment_name: str) -> str | None:
        if self._artifact_root is None:
            return None  # the tracking server's default root
        folder = re.sub(r"[^\w\-.]", "_", experiment_name)
        if "://" in self._artifact_root:
            return f"{self._artifact_root.rstrip('/')}/{folder}"
        return (Path(self._artifact_root).resolve() / folder).as_uri()


def _snapshot(run: Run) -> RunSnapshot:
    return RunSnapshot(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        artifact_uri=run.info.artifact_uri,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        latest_metrics=dict(run.data.metrics),
    )
