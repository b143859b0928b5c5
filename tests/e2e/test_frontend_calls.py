"""End to end, the original frontend's remaining calls against the whole stack as processes (REST only): the
validation tab's per-image views on what the real classifier reported, a deployment's endpoint answering
held-out digits through a real runner, the test panel's single-image path, and `datasets/analyze`. What the
API released is gone from storage's directory afterwards, and no service was refused anything by NATS."""

from __future__ import annotations

import base64
import csv
import io
import uuid
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pytest
from PIL import Image

from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.cli.stack import EmbeddedStack
from visionyard.shared.natsserver import free_port

from ..jobproof import poll, simple_cnn_job, trained_job, upload_zip

pytestmark = pytest.mark.e2e


# The shared poll (tests/jobproof.py) with this file's patience.
_poll = partial(poll, timeout=180.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stack with a completed 3-epoch training job on the digits (train/ and val/ folders) and its ONNX export."""
    data_dir = tmp_path_factory.mktemp("stack")
    scratch = tmp_path_factory.mktemp("digits")
    summary = build_digits_imagefolder(scratch / "digits.zip", scratch / "heldout")
    with EmbeddedStack(data_dir=data_dir, api_port=free_port(), runners=1) as stack, \
            httpx.Client(base_url=stack.api_url, timeout=180) as api:
        dataset = upload_zip(api, summary.zip_path)
        job = trained_job(api, simple_cnn_job(dataset))
        export = api.post("/api/v1/export/jobs", json={"training_job_id": job["id"], "export_format": "onnx"}).json()
        export = _poll(lambda: api.get(f"/api/v1/export/jobs/{export['id']}").json(),
                       lambda e: e["status"] in ("completed", "failed"))
        assert export["status"] == "completed", export
        with (summary.heldout_dir / "labels.csv").open() as handle:
            heldout = [(summary.heldout_dir / row["path"], row["label"]) for row in csv.DictReader(handle)]
        yield {"stack": stack, "api": api, "job": job, "export": export, "dataset": dataset, "heldout": heldout,
               "zip": summary.zip_path, "uploads": data_dir / "storage" / "visionyard-external" / "inference"}
    # Every service ran as its own NATS user: none was refused anything (cmd.upload.delete included).
    assert stack.permission_violations() == []


def _stored_file(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(unquote(urlparse(uri).path))


def test_the_validation_tab_lists_what_the_classifier_reported_and_shows_each_image(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job = world["job"]
    summary = api.get(f"/api/v1/validation/jobs/{job['id']}/summary").json()
    last = summary["epoch_metrics"][-1]["epoch"]
    results = api.get(f"/api/v1/validation/jobs/{job['id']}/results/{last}").json()
    listed = api.get(f"/api/v1/validation/jobs/{job['id']}/results/{last}/images", params={"limit": 1000}).json()
    matrix = results["confusion_matrix"]
    assert listed["complete"] and listed["total_count"] == sum(map(sum, matrix))
    rebuilt = [[0] * len(matrix) for _ in matrix]
    for row in listed["images"]:
        rebuilt[row["true_label_id"]][row["predicted_label_id"]] += 1
        # The true label is the image's class folder in the uploaded val/ split.
        assert row["image_path"].startswith(f"val/{row['true_label']}/")
    assert rebuilt == matrix
    correct = sum(row["is_correct"] for row in listed["images"])
    assert abs(correct / len(listed["images"]) - results["overall_metrics"]["accuracy"]) < 1e-9

    # One cell of the matrix, as ImageViewer asks for it, and the image itself: the uploaded file's bytes.
    wrong = next((row for row in listed["images"] if not row["is_correct"]), listed["images"][0])
    cell = api.get(f"/api/v1/validation/jobs/{job['id']}/results/{last}/images", params={
        "true_label_id": wrong["true_label_id"], "predicted_label_id": wrong["predicted_label_id"]}).json()
    assert wrong["id"] in [row["id"] for row in cell["images"]]
    picture = api.get(f"/api/v1/validation/images/{wrong['id']}")
    assert picture.status_code == 200, picture.text
    with zipfile.ZipFile(world["zip"]) as archive:
        assert picture.content == archive.read(wrong["image_path"])


def test_a_deployment_answers_heldout_digits_with_its_key_and_keeps_no_image(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    created = api.post("/api/v1/export/deployments", json={
        "export_job_id": world["export"]["id"], "deployment_type": "platform_endpoint",
        "deployment_config": {"auto_activate": True}})
    assert created.status_code == 201, created.text
    config = api.get(f"/api/v1/deployments/{created.json()['id']}").json()["deployment_config"]
    key = {"Authorization": f"Bearer {config['api_key']}"}
    sample = world["heldout"][:12]
    correct = 0
    for path, label in sample:
        answer = httpx.post(config["endpoint_url"], headers=key, timeout=180,
                            json={"image": base64.b64encode(path.read_bytes()).decode(), "confidence_threshold": 0.0})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["inference_time_ms"] > 0 and result["task_type"] == "image_classification"
        correct += result["classification_result"]["class_name"] == label
    assert correct >= 9, correct  # validation accuracy after 3 epochs is about 0.9
    refused = httpx.post(config["endpoint_url"], json={"image": "AAAA"}, timeout=30,
                         headers={"Authorization": f"Bearer {config['api_key'][:-2]}xx"})
    assert refused.status_code == 401
    usage = api.get(f"/api/v1/deployments/{created.json()['id']}").json()["usage_stats"]
    assert usage["request_count"] == len(sample) and usage["avg_latency_ms"] >= usage["avg_inference_time_ms"] > 0

    def deployment_images() -> list[Path]:
        folder = world["uploads"]
        return [p for p in folder.glob("deployment-*/*") if p.is_file()] if folder.is_dir() else []

    _poll(deployment_images, lambda files: files == [], timeout=60)  # storage deleted every request's image


def test_the_single_image_path_and_its_release(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job = world["job"]
    path, label = world["heldout"][20]
    session = str(uuid.uuid4())
    uploaded = api.post("/api/v1/test_inference/inference/upload-image", params={"session_id": session},
                        files={"file": (path.name, path.read_bytes(), "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    stored = _stored_file(uploaded.json()["server_path"])
    assert stored.is_file() and Image.open(io.BytesIO(stored.read_bytes())).size == Image.open(path).size
    answer = api.post("/api/v1/test_inference/inference/quick", params={
        "training_job_id": job["id"], "image_path": uploaded.json()["server_path"], "top_k": 3,
        "confidence_threshold": 0.0})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert len(result["top5_predictions"]) == 3 and result["predicted_label"] == result["top5_predictions"][0]["label"]
    assert result["task_type"] == "image_classification" and result["inference_time_ms"] > 0
    released = api.delete(f"/api/v1/test_inference/inference/session/{session}")
    assert released.status_code == 200 and released.json()["deleted_files"] == 1
    _poll(lambda: stored.exists(), lambda exists: not exists, timeout=60)


def test_analyze_names_a_stored_dataset_and_never_a_host_path(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    answer = api.post("/api/v1/datasets/analyze", json={"path": world["dataset"], "format_hint": None})
    assert answer.status_code == 200 and answer.json()["dataset_info"]["format"] == "imagefolder"
    assert answer.json()["dataset_info"]["num_classes"] == 10
    refused = api.post("/api/v1/datasets/analyze", json={"path": str(world["zip"].parent), "format_hint": None})
    assert refused.status_code == 422 and refused.json()["message"].startswith("path:")
