"""The MLflow run store adapter against a real SQLite MLflow store (no broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from visionyard.tracker.adapters.mlflow_store import MlflowRunStore
from visionyard.tracker.ports import MetricPoint, RunStatus, SetStatus
from visionyard.tracker.service import TAG_JOB_ID, log_batches

pytestmark = pytest.mark.integration


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
async def store(uri: str, tmp_path: Path) -> AsyncIterator[MlflowRunStore]:
    opened = MlflowRunStore(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts"))
    await opened.open()
    yield opened
    opened.close()


async def create(store: MlflowRunStore, job_id: str, experiment: str = "exp") -> str:
    snapshot = await store.create_run(job_id=job_id, experiment_name=experiment, start_time=1, tags={TAG_JOB_ID: job_id})
    return snapshot.run_id


async def test_one_write_applies_batches_then_the_status_and_keeps_latest_metrics_right(
    store: MlflowRunStore, uri: str
) -> None:
    run_id = await create(store, "job1")
    # Points arrive oldest first; the adapter hands them to MLflow newest first.
    points = [MetricPoint(f"m{i % 3}", float(i), i // 3, 1000 + i // 3) for i in range(2400)]
    writes = [*log_batches(run_id, metrics=points, params={"lr": "0.1"}, tags={"t": "x"})]
    writes.append(SetStatus(run_id, RunStatus.FINISHED, end_time=5000))
    await store.write(writes)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == 5000
    assert run.data.params == {"lr": "0.1"} and run.data.tags["t"] == "x"
    # The latest value of each key is its value at the highest step, whatever the order of logging.
    assert run.data.metrics == {"m0": 2397.0, "m1": 2398.0, "m2": 2399.0}
    history = await store.metric_history(run_id, "m1")
    assert [p.step for p in history] == list(range(800))

    # Re-applying the same writes (a redelivered batch) stores nothing new; RUNNING reopens the run.
    await store.write([*writes[:-1], SetStatus(run_id, RunStatus.RUNNING)])
    assert len(await store.metric_history(run_id, "m1")) == 800
    assert client.get_run(run_id).info.status == "RUNNING"


async def test_a_run_created_elsewhere_after_the_experiments_were_listed_is_found(
    store: MlflowRunStore, uri: str, tmp_path: Path
) -> None:
    await create(store, "mine", experiment="first")
    assert await store.find_run("theirs") is None

    # Another replica creates a new experiment and the job's run in it, after our listing.
    other = MlflowRunStore(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts"))
    try:
        theirs = await create(other, "theirs", experiment="second")
    finally:
        other.close()

    # Our miss lists the experiments again rather than trusting the ones listed at start.
    found = await store.find_run("theirs")
    assert found is not None and found.run_id == theirs


async def test_a_run_in_a_deleted_experiment_is_recreated_on_the_retry(store: MlflowRunStore, uri: str) -> None:
    await create(store, "job1", experiment="gone")
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)

    assert await store.find_run("job1") is None
    with pytest.raises(MlflowException):
        await create(store, "job2", experiment="gone")  # the cached experiment id is stale: the batch fails
    run_id = await create(store, "job2", experiment="gone")  # its retry restores the experiment
    assert client.get_run(run_id).info.lifecycle_stage == "active"
    assert client.get_experiment_by_name("gone").lifecycle_stage == "active"


async def test_what_log_batches_packs_is_stored_whole(store: MlflowRunStore) -> None:
    run_id = await create(store, "wide")
    points = [MetricPoint(f"k{i}", float(i), 0, 0) for i in range(1500)]
    params = {f"p{i}": "v" for i in range(150)}
    tags = {f"t{i}": "v" for i in range(120)}
    await store.write(log_batches(run_id, metrics=points, params=params, tags=tags))
    snapshot = await store.get_run(run_id)
    assert snapshot is not None and len(snapshot.latest_metrics) == 1500 and snapshot.latest_metrics["k7"] == 7.0
    assert snapshot.params == params and all(snapshot.tags[key] == "v" for key in tags)


async def test_the_only_writer_creates_a_job_run_with_one_search_and_finds_it_again(uri: str, tmp_path: Path) -> None:
    store = MlflowRunStore(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts"), single_writer=True)
    try:
        await store.open()
        client = store._mlflow()
        searches: list[str] = []
        original = client.search_runs

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            searches.append(kwargs.get("filter_string", ""))
            return original(*args, **kwargs)

        client.search_runs = counting  # type: ignore[method-assign]
        assert await store.find_run("job1") is None
        run_id = await create(store, "job1")
        # The miss is final and the created run is the job's: no re-listing, no canonical re-check.
        assert len(searches) == 1
        found = await store.find_run("job1")
        assert found is not None and found.run_id == run_id
        assert [run.info.run_id for run in MlflowClient(tracking_uri=uri).search_runs(
            [MlflowClient(tracking_uri=uri).get_experiment_by_name("exp").experiment_id])] == [run_id]
    finally:
        store.close()


async def test_every_mlflow_call_is_timed_by_operation(store: MlflowRunStore) -> None:
    from prometheus_client import REGISTRY

    def calls(operation: str) -> float:
        return REGISTRY.get_sample_value("visionyard_tracker_mlflow_seconds_count", {"operation": operation}) or 0.0

    before = {operation: calls(operation) for operation in ("create_run", "write", "metric_history")}
    run_id = await create(store, "timed-job")
    await store.write([*log_batches(run_id, metrics=[MetricPoint("loss", 0.5, 1, 1000)], params={}, tags={})])
    await store.metric_history(run_id, "loss")
    assert {operation: calls(operation) - count for operation, count in before.items()} == {
        "create_run": 1, "write": 1, "metric_history": 1,
    }
