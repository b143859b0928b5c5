"""What the whole-stack suites (faults, scale-out) share: driving digits jobs through REST, and the proof
that a job which went through a fault left every trace exactly once.

The proof (`Proof.check`): the job's final status is right; no process of the job is left; every
progress event the runners published (read back from the EVENTS stream) is in MLflow exactly once per
(metric, step) (a missing or an extra point fails); every checkpoint object in S3 has the sha256 the
API reports. Each check records the figures it measured (events emitted vs recorded, catch-up time).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.shared import streams, subjects
from visionyard.shared.config import server_urls
from visionyard.shared.events import ProgressReported
from visionyard.storage import keys as storage_keys

TERMINAL = {"completed", "failed", "cancelled"}
# moto's S3 takes any key; the suites use this one.
S3_KEY = "testing"


# -- observing the stack ------------------------------------------------------------------------


# What a fetch may raise while a service restarts or a NATS cluster elects a leader: not done yet.
NOT_YET = (httpx.HTTPError, KeyError, ValueError, NatsTimeoutError, NoRespondersError, ServiceUnavailableError)


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float = 180.0, every: float = 0.25) -> Any:
    """`fetch()` until `done(value)`; connection errors (a service being restarted, a NATS cluster electing a
    leader) count as not done."""
    deadline = time.monotonic() + timeout
    value: Any = None
    error: Exception | None = None
    while True:
        try:
            value = fetch()
            if done(value):
                return value
        except NOT_YET as caught:
            error = caught
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last value: {value}; last error: {error!r}")
        time.sleep(every)


def get_job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job as the API shows it (raises while the API is down)."""
    reply = api.get(f"/api/v1/training/jobs/{job_id}")
    reply.raise_for_status()
    return dict(reply.json())


def stored_checkpoints(api: httpx.Client, job_id: str) -> dict[str, dict[str, Any]]:
    """The job's stored checkpoints by kind."""
    reply = api.get(f"/api/v1/training/jobs/{job_id}/checkpoints")
    reply.raise_for_status()
    return {c["kind"]: c for c in reply.json()["checkpoints"]}


def job_events(nats_url: str, job_id: str, kind: str) -> list[dict[str, Any]]:
    """Every `kind` event of the job stored in the EVENTS stream, in stream order (raw JSON).

    `nats_url` may list a cluster's servers, comma-separated.
    """
    return [event for _, event in job_events_with_seq(nats_url, subjects.job_event(job_id, kind))]


def job_events_with_seq(nats_url: str, subject: str) -> list[tuple[int, dict[str, Any]]]:
    """(EVENTS stream sequence, raw JSON) of every stored event on `subject` (wildcards allowed), in order."""
    return asyncio.run(_read_subject(nats_url, subject))


async def _read_subject(url: str, subject: str) -> list[tuple[int, dict[str, Any]]]:
    """Read the subject's stored events; a cluster that is electing a leader refuses reads (503) or leaves them
    unanswered (creating the reading consumer timed out once right after a node loss): read again."""
    from nats.js.errors import APIError

    deadline = asyncio.get_running_loop().time() + 90.0
    while True:
        try:
            return await _read_subject_once(url, subject)
        except (APIError, NoRespondersError, NatsTimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)  # a retry interval, not a readiness wait


async def _read_subject_once(url: str, subject: str) -> list[tuple[int, dict[str, Any]]]:
    import nats
    from nats.js import api as js_api

    nc = await nats.connect(server_urls(url))
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, stream="EVENTS",
            config=js_api.ConsumerConfig(ack_policy=js_api.AckPolicy.NONE, deliver_policy=js_api.DeliverPolicy.ALL,
                                         inactive_threshold=30.0),
        )
        found: list[tuple[int, dict[str, Any]]] = []
        while True:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                # Done only when the consumer says nothing is left (a slow fetch is not the end).
                if (await sub.consumer_info()).num_pending == 0:
                    break
                continue
            found.extend((msg.metadata.sequence.stream, json.loads(msg.data)) for msg in batch)
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


def backlog(nats_url: str, consumer: streams.ConsumerSpec) -> int:
    """Events `consumer` has not settled yet: still to deliver, or delivered and not acknowledged."""
    return asyncio.run(_backlog(nats_url, consumer))


async def _backlog(url: str, consumer: streams.ConsumerSpec) -> int:
    import nats

    nc = await nats.connect(server_urls(url))
    try:
        info = await nc.jetstream().consumer_info(consumer.stream, consumer.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    finally:
        await nc.close()


def job_processes(data_dir: Path, job_id: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of every live trainer process working in the job's directory under `data_dir`."""
    # Job ids are small integers, the same in every stack on the machine: only this stack's data dir tells.
    inside = f"{data_dir.resolve()}/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # The runner trains in <work_dir>/jobs/<job id>/<attempt>: match the whole id, not a digit of a path.
        if ("visionyard.trainers" in cmdline and cwd.startswith(inside) and f"/jobs/{job_id}/" in cwd
                and stat[0] != "Z"):
            found.append((int(entry.name), int(stat[1])))
    return found


def expected_points(progress: list[dict[str, Any]]) -> Counter[tuple[str, int]]:
    """(metric, step) → how many progress events carried it (each published event counted once)."""
    counts: Counter[tuple[str, int]] = Counter()
    seen: set[tuple[int, int]] = set()
    for raw in progress:
        event = ProgressReported.model_validate(raw)
        if (event.attempt, event.seq) in seen:
            continue
        seen.add((event.attempt, event.seq))
        step = event.step if event.step is not None else event.epoch
        for key in event.metrics:
            counts[(key, step)] += 1
    return counts


def recorded_points(tracking_uri: str, run_id: str, keys: set[str]) -> Counter[tuple[str, int]]:
    """(metric, step) → how many points the MLflow run holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    counts: Counter[tuple[str, int]] = Counter()
    for key in keys:
        for point in client.get_metric_history(run_id, key):
            counts[(key, int(point.step))] += 1
    return counts


# -- driving jobs ---------------------------------------------------------------------------------


def upload_digits(api: httpx.Client, scratch: Path) -> str:
    """The digits ImageFolder, uploaded through REST and ready; its dataset id."""
    build_digits_imagefolder(scratch / "digits.zip", scratch / "heldout")
    return upload_zip(api, scratch / "digits.zip")


def upload_zip(api: httpx.Client, zip_path: Path, *, name: str = "digits") -> str:
    """A dataset zip, uploaded through REST and ready; its dataset id."""
    created = api.post("/api/v1/datasets", json={"name": name, "visibility": "private"})
    assert created.status_code in (200, 201), created.text
    identifier = str(created.json()["dataset_id"])
    with zip_path.open("rb") as handle:
        uploaded = api.post(f"/api/v1/datasets/{identifier}/upload",
                            files={"file": (zip_path.name, handle, "application/zip")})
    assert uploaded.status_code == 202, uploaded.text
    dataset = poll(lambda: api.get(f"/api/v1/datasets/{identifier}").json(),
                   lambda d: d["status"] in ("ready", "rejected"), timeout=180, every=0.3)
    assert dataset["status"] == "ready", dataset
    return identifier


def simple_cnn_job(dataset_id: str, *, epochs: int = 3) -> dict[str, Any]:
    """The body of a simple_cnn classification job on a digits dataset."""
    return {"config": {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
                       "dataset_id": dataset_id, "epochs": epochs, "batch_size": 32, "learning_rate": 0.005}}


def trained_job(api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Create and start a job, wait for it to end, assert it completed; the job as the API shows it."""
    poll(lambda: api.get("/api/v1/models/list").text, lambda text: body["config"]["model_name"] in text, timeout=60)
    job = api.post("/api/v1/training/jobs", json=body).json()
    assert api.post(f"/api/v1/training/jobs/{job['id']}/start").status_code == 200
    job = poll(lambda: get_job(api, str(job["id"])), lambda j: j["status"] in TERMINAL, timeout=300)
    assert job["status"] == "completed", job
    return job


def start_job(api: httpx.Client, dataset_id: str, *, epochs: int, experiment: str = "faults") -> str:
    """Create and start a simple_cnn job on digits; its id."""
    body = {
        "experiment_name": experiment,
        "config": {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "classification",
                   "dataset_id": dataset_id, "epochs": epochs, "batch_size": 32, "learning_rate": 0.005,
                   # 16 px keeps an epoch around a second on 2 cores: faults land mid-training, suites stay short.
                   "advanced_config": {"image_size": 16}},
    }
    poll(lambda: api.get("/api/v1/models/list").text, lambda text: "simple_cnn" in text, timeout=60)
    created = api.post("/api/v1/training/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = str(created.json()["id"])
    started = api.post(f"/api/v1/training/jobs/{job_id}/start")
    assert started.status_code == 200, started.text
    return job_id


def s3_client(endpoint: str) -> Any:
    """A boto3 client of moto's S3."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
                        region_name="us-east-1")


# -- the proof every scenario ends with ------------------------------------------------------------


class Proof:
    """Runs the after-fault checks on one stack and records each scenario's figures.

    `nats_url` (admin credentials; a cluster's servers comma-separated) reads the EVENTS stream,
    `tracking_uri` the MLflow store, `data_dir` tells this stack's trainer processes from others'.
    """

    def __init__(self, *, api: httpx.Client, nats_url: str, tracking_uri: str, data_dir: Path, s3: dict[str, Any],
                 figures: list[dict[str, Any]], figures_file: Path | None = None) -> None:
        self.api = api
        self.nats_url = nats_url
        self.tracking_uri = tracking_uri
        self.data_dir = data_dir
        self.s3 = s3
        self.figures = figures
        self.figures_file = figures_file

    def check(self, job_id: str, *, expected_status: str, scenario: str, fault_at: float,
              **measured: Any) -> dict[str, Any]:
        """Assert status, exactly-once metrics, checkpoint integrity, no leftover process; record figures."""
        final = poll(lambda: get_job(self.api, job_id), lambda j: j["status"] in TERMINAL, timeout=240)
        measured["fault_to_terminal_s"] = time.monotonic() - fault_at
        assert final["status"] == expected_status, final

        # No process of the job is left (the runner reaps the group before the terminal event).
        leftovers = poll(lambda: job_processes(self.data_dir, job_id), lambda found: not found, timeout=30)
        assert leftovers == []

        # Every published progress event is in MLflow exactly once per (metric, step).
        progress = job_events(self.nats_url, job_id, "progress")
        expected = expected_points(progress)
        assert expected, "the trainer should have reported progress"
        keys = {key for key, _ in expected}
        run_id = poll(lambda: get_job(self.api, job_id)["mlflow_run_id"], bool, timeout=120)
        settled_at = time.monotonic()
        try:
            recorded = poll(lambda: recorded_points(self.tracking_uri, run_id, keys), lambda r: r == expected,
                            timeout=150, every=0.5)
        except AssertionError:
            recorded = recorded_points(self.tracking_uri, run_id, keys)
        # A late redelivery would add a duplicate: look again once the tracker holds no event unsettled.
        poll(lambda: backlog(self.nats_url, streams.TRACKER), lambda left: left == 0, timeout=120)
        recorded = recorded_points(self.tracking_uri, run_id, keys)
        mlflow_catch_up = time.monotonic() - settled_at
        missing = sum((expected - recorded).values())
        duplicates = sum((recorded - expected).values())
        assert (missing, duplicates) == (0, 0), {
            "missing": dict(expected - recorded), "duplicates": dict(recorded - expected)}

        # Every checkpoint object in S3 has the sha256 the API reports for its kind, once the API's projector
        # holds no event unsettled: an event redelivered late (its first delivery died with an API process)
        # must not change what the API reports.
        poll(lambda: backlog(self.nats_url, streams.API_PROJECTOR), lambda left: left == 0, timeout=120)
        objects = poll(lambda: self._s3_pt_objects(storage_keys.checkpoint_prefix(job_id)), bool, timeout=60)
        api_checkpoints = poll(lambda: stored_checkpoints(self.api, job_id),
                               lambda c: {storage_keys.checkpoint_key(job_id, kind) for kind in c} >= set(objects),
                               timeout=60)
        kinds = {storage_keys.checkpoint_key(job_id, kind): kind for kind in api_checkpoints}
        for key, sha in objects.items():
            kind = kinds[key]
            assert api_checkpoints[kind]["sha256"] == sha, (key, api_checkpoints[kind])
            assert api_checkpoints[kind]["uri"].endswith(key)

        figure = {
            "scenario": scenario,
            "status": final["status"],
            "attempts": final["attempt"],
            "progress_events_emitted": len({(e["attempt"], e["seq"]) for e in progress}),
            "metric_points_expected": sum(expected.values()),
            "metric_points_recorded": sum(recorded.values()),
            "missing": missing,
            "duplicates": duplicates,
            "checkpoints_in_s3": len(objects),
            "mlflow_catch_up_after_terminal_s": round(mlflow_catch_up, 2),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in measured.items()},
        }
        self.figures.append(figure)
        if self.figures_file is not None:
            existing = json.loads(self.figures_file.read_text()) if self.figures_file.exists() else []
            self.figures_file.write_text(json.dumps([*existing, figure], indent=2))
        print(f"FAULT {scenario}: {json.dumps(figure, sort_keys=True)}")
        return final

    def _s3_pt_objects(self, prefix: str) -> dict[str, str]:
        found = {}
        bucket = self.s3["bucket"]
        client = self.s3["client"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith(".pt"):
                    body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                    found[item["Key"]] = hashlib.sha256(body).hexdigest()
        return found
