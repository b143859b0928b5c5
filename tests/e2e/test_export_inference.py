"""End to end: train on digits, export to ONNX, download and run the package's example, and run an
inference job on held-out digits, through REST and the WebSocket only (the whole stack as processes)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.cli.stack import EmbeddedStack
from visionyard.shared.natsserver import free_port

from ..jobproof import poll, simple_cnn_job, trained_job, upload_zip

pytestmark = pytest.mark.e2e


# The shared poll (tests/jobproof.py) with this file's patience.
_poll = partial(poll, timeout=180.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stack with a completed 3-epoch training job on the digits, and the held-out digits on disk."""
    data_dir = tmp_path_factory.mktemp("stack")
    scratch = tmp_path_factory.mktemp("digits")
    summary = build_digits_imagefolder(scratch / "digits.zip", scratch / "heldout")
    with EmbeddedStack(data_dir=data_dir, api_port=free_port(), runners=1) as stack, \
            httpx.Client(base_url=stack.api_url, timeout=60) as api:
        identifier = upload_zip(api, summary.zip_path)
        pending_job = api.post("/api/v1/training/jobs", json=simple_cnn_job(identifier)).json()  # never started
        job = trained_job(api, simple_cnn_job(identifier))
        with (summary.heldout_dir / "labels.csv").open() as handle:
            heldout = [(summary.heldout_dir / row["path"], row["label"]) for row in csv.DictReader(handle)]
        yield {"stack": stack, "api": api, "job": job, "pending_job": pending_job, "heldout": heldout,
               "scratch": scratch}
    # Every service ran as its own NATS user: none was refused anything it needed (export, inference).
    assert stack.permission_violations() == []


def test_onnx_export_validates_downloads_and_its_example_classifies_heldout_digits(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job = world["job"]
    stack: EmbeddedStack = world["stack"]
    capabilities = api.get("/api/v1/export/capabilities", params={"training_job_id": job["id"]}).json()
    assert {f["format"] for f in capabilities["supported_formats"] if f["supported"]} == {"onnx", "torchscript"}
    # The training job's live feed announces the export's status changes.
    seen: list[dict[str, Any]] = []
    # last_seq=0: the job's whole feed, so nothing the export announces can slip in before the subscription.
    ws_url = stack.api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={job['id']}&last_seq=0"

    def listen() -> None:
        with connect(ws_url, open_timeout=10) as socket:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    message = json.loads(socket.recv(timeout=1))
                except TimeoutError:
                    continue
                if message["type"] == "export_status_change":
                    seen.append(message)
                    if message["new_status"] in ("completed", "failed"):
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    created = api.post("/api/v1/export/jobs", json={
        "training_job_id": job["id"], "export_format": "onnx", "export_config": {"opset_version": 17},
        "validation_config": {"validate_outputs": True, "tolerance": 1e-4, "num_samples": 8},
    })
    assert created.status_code == 201, created.text
    export = created.json()
    assert export["version"] == 1 and export["is_default"] is True and export["status"] == "pending"
    assert export["checkpoint_path"] == job["best_checkpoint_path"]
    export = _poll(lambda: api.get(f"/api/v1/export/jobs/{export['id']}").json(),
                   lambda e: e["status"] in ("completed", "failed"))
    assert export["status"] == "completed", export
    assert export["validation_passed"] is True
    assert export["export_results"]["max_abs_diff"] <= 1e-4
    assert export["file_size_mb"] > 0
    listener.join(timeout=30)
    assert [m["new_status"] for m in seen][-1] == "completed" and all(m["export_job_id"] == export["id"] for m in seen)

    url = api.get(f"/api/v1/export/{export['id']}/download").json()["download_url"]
    package = httpx.get(url, timeout=60)
    assert package.status_code == 200
    target = world["scratch"] / "package"
    zipfile.ZipFile(io.BytesIO(package.content)).extractall(target)
    sample = world["heldout"][:20]
    run = subprocess.run([sys.executable, "example.py", *[str(path) for path, _ in sample]], cwd=target,
                         capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr
    predicted = [line.split("\t")[1] for line in run.stdout.strip().splitlines()]
    correct = sum(p == label for p, (_, label) in zip(predicted, sample, strict=True))
    assert correct >= 16, run.stdout

    second = api.post("/api/v1/export/jobs", json={"training_job_id": job["id"], "export_format": "torchscript",
                                                   "set_as_default": True}).json()
    assert second["version"] == 2 and second["is_default"] is True
    listing = api.get(f"/api/v1/export/training/{job['id']}/exports").json()
    assert [e["version"] for e in listing["export_jobs"]] == [2, 1]
    assert [e["is_default"] for e in listing["export_jobs"]] == [True, False]


def test_inference_on_heldout_digits_matches_validation_accuracy(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job = world["job"]
    heldout = world["heldout"]
    files = [("files", (path.name, path.read_bytes(), "image/png")) for path, _ in heldout]
    uploaded = api.post("/api/v1/test_inference/inference/upload-images", params={"training_job_id": job["id"]},
                        files=files)
    assert uploaded.status_code == 200, uploaded.text
    uploads = uploaded.json()
    assert uploads["total_files"] == len(heldout)
    label_of = {item["s3_uri"]: label for item, (_, label) in zip(uploads["uploaded_files"], heldout, strict=True)}
    created = api.post("/api/v1/test_inference/inference/jobs", json={
        "training_job_id": job["id"], "inference_type": "batch",
        "input_data": {"image_paths_s3": [item["s3_uri"] for item in uploads["uploaded_files"]]},
    })
    assert created.status_code == 201, created.text
    inference = _poll(lambda: api.get(f"/api/v1/test_inference/inference/jobs/detail/{created.json()['id']}").json(),
                      lambda i: i["status"] in ("completed", "failed"))
    assert inference["status"] == "completed", inference
    assert inference["total_images"] == len(heldout) and inference["avg_inference_time_ms"] > 0
    rows: list[dict[str, Any]] = []
    while len(rows) < len(heldout):
        page = api.get(f"/api/v1/test_inference/inference/jobs/{inference['id']}/results",
                       params={"skip": len(rows), "limit": 50}).json()
        assert page["total_count"] == len(heldout)
        rows += page["results"]
    assert len(rows[0]["top5_predictions"]) == 5
    names = {item["unique_filename"]: item["s3_uri"] for item in uploads["uploaded_files"]}
    correct = sum(row["predicted_label"] == label_of[names[row["image_name"]]] for row in rows)
    accuracy = correct / len(rows)
    assert abs(accuracy - job["final_accuracy"]) <= 0.05, (accuracy, job["final_accuracy"])
    summary = api.get(f"/api/v1/test_inference/inference/jobs/{job['id']}").json()
    assert summary["completed"] >= 1 and summary["total_images"] >= len(heldout)


def test_bad_requests_get_clear_errors_and_change_nothing(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job, pending = world["job"], world["pending_job"]
    before = api.get(f"/api/v1/export/training/{job['id']}/exports").json()["total"]
    unknown = api.post("/api/v1/export/jobs", json={"training_job_id": 999999, "export_format": "onnx"})
    assert unknown.status_code == 404 and "training_job_id" in unknown.json()["detail"]
    not_an_id = api.post("/api/v1/export/jobs", json={"training_job_id": "nope", "export_format": "onnx"})
    assert not_an_id.status_code == 422 and "training_job_id" in not_an_id.json()["detail"]
    not_done = api.post("/api/v1/export/jobs", json={"training_job_id": pending["id"], "export_format": "onnx"})
    assert not_done.status_code == 409 and "pending" in not_done.json()["detail"]
    bad_format = api.post("/api/v1/export/jobs", json={"training_job_id": job["id"], "export_format": "tflite"})
    assert bad_format.status_code == 422 and "export_format" in bad_format.json()["detail"]
    bad_checkpoint = api.post("/api/v1/export/jobs", json={"training_job_id": job["id"], "export_format": "onnx",
                                                           "checkpoint_path": "file:///nowhere.pt"})
    assert bad_checkpoint.status_code == 404 and "checkpoint_path" in bad_checkpoint.json()["detail"]
    assert api.get(f"/api/v1/export/training/{job['id']}/exports").json()["total"] == before
    not_image = api.post("/api/v1/test_inference/inference/upload-images",
                         files=[("files", ("notes.txt", b"hello, not an image", "text/plain"))])
    assert not_image.status_code == 422 and "notes.txt" in not_image.json()["detail"]
    foreign = api.post("/api/v1/test_inference/inference/jobs", json={
        "training_job_id": job["id"], "input_data": {"image_paths_s3": ["s3://elsewhere/x.png"]}})
    assert foreign.status_code == 422 and "image_paths_s3" in foreign.json()["detail"]
