"""End to end: the whole embedded stack as separate processes, driven only through REST, WebSocket
and what the services leave behind (stored checkpoints, the MLflow store)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pytest
from websockets.sync.client import connect

from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.cli.stack import EmbeddedStack
from visionyard.shared.natsserver import free_port

from ..jobproof import poll

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "cancelled"}
TRACING_ENV = "VISIONYARD_TRACING_FILE_DIR"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedStack(data_dir=data_dir, api_port=free_port(), runners=1)
    # Every service records its spans to a JSON-lines file here (the services inherit the environment).
    previous = os.environ.get(TRACING_ENV)
    os.environ[TRACING_ENV] = str(data_dir / "traces")
    try:
        with embedded:
            started = embedded.pids()
            yield embedded
    finally:
        if previous is None:
            os.environ.pop(TRACING_ENV, None)
        else:
            os.environ[TRACING_ENV] = previous
    survivors = [pid for pid in started if _alive(pid)]
    assert not survivors, f"processes {survivors} survived the stack's shutdown"
    # Every service ran as its own NATS user: none was refused anything it needed.
    assert embedded.permission_violations() == []


@pytest.fixture(scope="module")
def api(stack: EmbeddedStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    scratch = tmp_path_factory.mktemp("digits")
    build_digits_imagefolder(scratch / "digits.zip", scratch / "heldout")
    created = api.post("/api/v1/datasets", json={"name": "digits", "visibility": "private"})
    assert created.status_code in (200, 201), created.text
    identifier = created.json()["dataset_id"]
    with (scratch / "digits.zip").open("rb") as handle:
        uploaded = api.post(f"/api/v1/datasets/{identifier}/upload", files={"file": ("digits.zip", handle, "application/zip")})
    assert uploaded.status_code == 202, uploaded.text
    dataset = _poll(lambda: api.get(f"/api/v1/datasets/{identifier}").json(), lambda d: d["status"] in ("ready", "rejected"))
    assert dataset["status"] == "ready", dataset
    assert dataset["num_classes"] == 10 and dataset["content_hash"]
    return identifier


# The shared poll (tests/jobproof.py) with this file's patience.
_poll = partial(poll, timeout=120.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive for our purposes only if its parent reaped it
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def _create_job(api: httpx.Client, dataset_id: str, *, epochs: int) -> dict[str, Any]:
    models = _poll(lambda: api.get("/api/v1/models/list").json(), lambda m: bool(_model_names(m)), timeout=60)
    assert "simple_cnn" in _model_names(models)
    body = {
        "experiment_name": "e2e",
        "config": {
            "framework": "pytorch",
            "model_name": "simple_cnn",
            "task_type": "classification",
            "dataset_id": dataset_id,
            "epochs": epochs,
            "batch_size": 32,
            "learning_rate": 0.005,
        },
    }
    created = api.post("/api/v1/training/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "pending" and job["task_type"] == "image_classification"
    assert job["num_classes"] == 10  # defaulted from the dataset
    return job


def _model_names(listing: Any) -> set[str]:
    text = json.dumps(listing)
    return {name for name in ("simple_cnn", "tiny_resnet") if f'"{name}"' in text}


def _ws_url(stack: EmbeddedStack, job_id: int, last_seq: int | None = None) -> str:
    url = stack.api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={job_id}"
    return url + (f"&last_seq={last_seq}" if last_seq is not None else "")


def _collect_until_terminal(url: str, *, stop_after: int | None = None, timeout: float = 300) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with connect(url) as socket:
        while time.monotonic() < deadline:
            message = json.loads(socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            messages.append(message)
            if message["type"] in ("training_complete", "training_error"):
                return messages
            if stop_after is not None and len([m for m in messages if "seq" in m]) >= stop_after:
                return messages
    raise AssertionError(f"no terminal message in time; got {[m['type'] for m in messages]}")


def test_digits_job_trains_tracks_and_stores_checkpoints(stack: EmbeddedStack, api: httpx.Client, dataset_id: str) -> None:
    epochs = 3
    job = _create_job(api, dataset_id, epochs=epochs)
    job_id = job["id"]
    started = api.post(f"/api/v1/training/jobs/{job_id}/start")
    assert started.status_code == 200 and started.json()["status"] == "queued", started.text
    # Starting a job already on its way answers it as is (the original frontend does after restart).
    again = api.post(f"/api/v1/training/jobs/{job_id}/start")
    assert again.status_code == 200 and again.json()["status"] in ("queued", "running"), again.text
    assert again.json()["attempt"] == 1

    # Live feed from the start (last_seq=0): read part of it, drop the connection, resume with last_seq.
    first = _collect_until_terminal(_ws_url(stack, job_id, 0), stop_after=4)
    last_seq = max(m["seq"] for m in first if "seq" in m)
    rest = first if first[-1]["type"] == "training_complete" else _collect_until_terminal(_ws_url(stack, job_id, last_seq))
    feed = [m for m in first if "seq" in m] + ([m for m in rest if "seq" in m] if rest is not first else [])
    progress_epochs = [m["current_epoch"] for m in feed if m["type"] == "training_progress"]
    assert progress_epochs == list(range(1, epochs + 1)), progress_epochs  # none missed, none twice
    seqs = [m["seq"] for m in feed]
    assert seqs == sorted(seqs)
    changes = [m["new_status"] for m in feed if m["type"] == "training_status_change"]
    assert changes[:2] == ["queued", "running"] and changes[-1] == "completed"
    assert feed[-1]["type"] == "training_complete"
    assert {m["job_id"] for m in feed} == {job_id}  # the integer id in every message
    # The terminal message is sent only once the job's row shows it.
    assert api.get(f"/api/v1/training/jobs/{job_id}").json()["status"] == "completed"

    final = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}").json(), lambda j: j["status"] in TERMINAL)
    assert final["status"] == "completed", final
    assert final["final_accuracy"] > 0.8, final
    assert final["current_epoch"] == epochs and final["dataset_snapshot_id"]

    metrics = api.get(f"/api/v1/training/jobs/{job_id}/metrics").json()
    rows = metrics if isinstance(metrics, list) else metrics.get("metrics", metrics.get("items"))
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))

    checkpoints = api.get(f"/api/v1/training/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert {c["kind"] for c in checkpoints} == {"best", "last"}
    for checkpoint in checkpoints:
        path = Path(unquote(urlparse(checkpoint["uri"]).path))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint["sha256"]
        assert path.stat().st_size == checkpoint["size_bytes"]

    summary = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}/mlflow/summary").json(),
                    lambda s: s.get("found") and s.get("status") == "FINISHED", timeout=60)
    assert summary["run_id"] == _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}").json()["mlflow_run_id"], bool)
    history = api.get(f"/api/v1/training/jobs/{job_id}/mlflow/metrics").json()
    points = history["metrics"]["accuracy"]
    assert sorted(p["step"] for p in points) == list(range(1, epochs + 1))  # one point per epoch, no duplicates

    # The run is really in the MLflow store a user opens with `mlflow ui`.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.tracking_uri)
    assert len(client.get_metric_history(summary["run_id"], "accuracy")) == epochs

    logs = api.get(f"/api/v1/training/jobs/{job_id}/logs", params={"limit": 500}).json()
    assert logs, "the trainer's output should be in the job's logs"
    assert all(isinstance(line["content"], str) and line["log_type"] for line in logs)  # as the frontend reads them

    _assert_one_trace_spans_the_services(stack, job_id)


def _spans(stack: EmbeddedStack) -> list[dict[str, Any]]:
    return [json.loads(line) for path in (stack.data_dir / "traces").glob("*.jsonl")
            for line in path.read_text().splitlines() if line.strip()]


def _assert_one_trace_spans_the_services(stack: EmbeddedStack, job_id: str) -> None:
    """The start request's trace reaches the runner, storage, the tracker and the API's projector; logs name it."""
    start_route = "POST /api/v1/training/jobs/{job_id}/start"
    every = {"api", "trainer-runner", "storage", "tracker"}

    def services_in_trace() -> tuple[str | None, set[str], set[str]]:
        spans = _spans(stack)
        starts = [s for s in spans if s["service"] == "api" and s["name"] == start_route]
        if not starts:
            return None, set(), set()
        trace_id = starts[0]["trace_id"]
        in_trace = [s for s in spans if s["trace_id"] == trace_id]
        return trace_id, {s["service"] for s in in_trace}, {s["name"] for s in in_trace}

    # Spans are exported in batches (every 0.5 s): wait for the last ones to land.
    trace_id, services, names = _poll(services_in_trace, lambda found: found[1] >= every, timeout=30)
    assert {"runner hold command", "consume tracker", "consume storage-artifacts", "consume api-projector"} <= names
    runner_log = [json.loads(line) for line in (stack.logs_dir / "runner.log").read_text().splitlines()
                  if line.startswith("{")]
    assert any(r.get("job_id") == str(job_id) and r.get("attempt") == 1 and r.get("trace_id") == trace_id
               for r in runner_log), "the runner's JSON logs should carry the job, its attempt and its trace id"


def test_cancel_stops_a_running_job_and_its_processes(stack: EmbeddedStack, api: httpx.Client, dataset_id: str) -> None:
    job = _create_job(api, dataset_id, epochs=500)
    job_id = job["id"]
    assert api.post(f"/api/v1/training/jobs/{job_id}/start").status_code == 200
    running = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}").json(),
                    lambda j: j["status"] == "running" and (j["current_epoch"] or 0) >= 1)
    trainer_pids = _trainer_pids(stack, job_id)
    assert trainer_pids, "the trainer process should be visible while running"
    cancelled = api.post(f"/api/v1/training/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    final = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}").json(), lambda j: j["status"] in TERMINAL, timeout=60)
    assert final["status"] == "cancelled", final
    assert running["status"] == "running"
    _poll(lambda: [pid for pid in trainer_pids if _alive(pid)], lambda alive: not alive, timeout=30)
    assert api.post(f"/api/v1/training/jobs/{job_id}/cancel").status_code == 409


def _trainer_pids(stack: EmbeddedStack, job_id: int) -> list[int]:
    # Job ids are small integers, the same in every stack on the machine: only this stack's data dir tells.
    inside = f"{stack.data_dir.resolve()}/"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        # The runner trains in <work_dir>/jobs/<job id>/<attempt>: match the whole id, not a digit of a path.
        if "visionyard.trainers" in cmdline and cwd.startswith(inside) and f"/jobs/{job_id}/" in cwd:
            pids.append(int(entry.name))
    return pids
