"""End to end: YOLO jobs on an uploaded YOLO-format zip and a COCO-format zip train through the platform
(runner → ultralytics trainer environment), report mAP per epoch to MLflow and the WebSocket, export to
ONNX that validates against PyTorch, and run inference that returns boxes. Tiny on purpose: 24 images at
64 px, 2 epochs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from visionyard.cli.datasets_shapes import CLASS_NAMES, build_shapes_dataset
from visionyard.cli.stack import EmbeddedStack
from visionyard.cli.trainer_envs import available
from visionyard.shared.natsserver import free_port

from ..jobproof import poll

pytestmark = pytest.mark.e2e

EPOCHS = 2
TERMINAL = ("completed", "failed", "cancelled")


# The shared poll (tests/jobproof.py) with this file's patience.
_poll = partial(poll, timeout=300.0)


def _listen(url: str, into: list[dict[str, Any]]) -> None:
    with connect(url, open_timeout=10) as socket:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                message = json.loads(socket.recv(timeout=1))
            except TimeoutError:
                continue
            into.append(message)
            if message["type"] in ("training_complete", "training_error"):
                return


def _upload(api: httpx.Client, zip_path: Path, name: str) -> str:
    identifier = api.post("/api/v1/datasets", json={"name": name, "visibility": "private"}).json()["dataset_id"]
    with zip_path.open("rb") as handle:
        response = api.post(f"/api/v1/datasets/{identifier}/upload", files={"file": (zip_path.name, handle, "application/zip")})
    assert response.status_code == 202, response.text
    dataset = _poll(lambda: api.get(f"/api/v1/datasets/{identifier}").json(), lambda d: d["status"] in ("ready", "failed"))
    assert dataset["status"] == "ready", dataset
    return identifier


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A stack, two uploaded datasets (YOLO and COCO form) and a finished 2-epoch YOLO job on each."""
    if "ultralytics" not in available():
        pytest.fail("the ultralytics trainer environment is not built: run `make trainer-env`")
    scratch = tmp_path_factory.mktemp("shapes")
    zips = {layout: build_shapes_dataset(scratch / layout, num_images=30, image_size=64, layout=layout, seed=11)
            for layout in ("yolo", "coco")}
    # On a machine busy with other work the API has taken more than the default minute to become ready.
    with EmbeddedStack(data_dir=tmp_path_factory.mktemp("stack"), api_port=free_port(), runners=1,
                       ready_timeout=180.0) as stack, \
            httpx.Client(base_url=stack.api_url, timeout=60) as api:
        datasets = {layout: _upload(api, summary.zip_path, f"shapes-{layout}") for layout, summary in zips.items()}
        _poll(lambda: api.get("/api/v1/models/list").json(),
              lambda models: any(m["model_name"] == "yolo11n" for m in models), timeout=60)
        jobs: dict[str, dict[str, Any]] = {}
        feeds: dict[str, list[dict[str, Any]]] = {}
        listeners = []
        for layout, dataset_id in datasets.items():
            created = api.post("/api/v1/training/jobs", json={"config": {
                "framework": "ultralytics", "model_name": "yolo11n", "task_type": "object_detection",
                "dataset_id": dataset_id, "dataset_format": layout, "epochs": EPOCHS, "batch_size": 8,
                "advanced_config": {"imgsz": 64, "mosaic": 0.0, "optimizer": "AdamW", "cos_lr": True},
            }})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            feeds[layout] = []
            # last_seq=0: the job's feed from its first event, whenever the socket subscribes.
            url = stack.api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={job_id}&last_seq=0"
            listener = threading.Thread(target=_listen, args=(url, feeds[layout]), daemon=True)
            listener.start()
            listeners.append(listener)
            assert api.post(f"/api/v1/training/jobs/{job_id}/start").status_code == 200
            jobs[layout] = {"id": job_id}
        for layout, job in jobs.items():
            jobs[layout] = _poll(lambda job_id=job["id"]: api.get(f"/api/v1/training/jobs/{job_id}").json(),
                                 lambda j: j["status"] in TERMINAL, timeout=900)
        for listener in listeners:
            listener.join(timeout=60)
        yield {"stack": stack, "api": api, "jobs": jobs, "feeds": feeds, "zips": zips}


@pytest.mark.parametrize("layout", ["yolo", "coco"])
def test_yolo_job_trains_and_reports_map_per_epoch_to_mlflow_and_the_websocket(world: dict[str, Any],
                                                                                layout: str) -> None:
    api: httpx.Client = world["api"]
    job = world["jobs"][layout]
    assert job["status"] == "completed", job
    assert job["current_epoch"] == EPOCHS
    checkpoints = api.get(f"/api/v1/training/jobs/{job['id']}/checkpoints").json()["checkpoints"]
    assert {c["kind"] for c in checkpoints} == {"best", "last"}

    progress = [m for m in world["feeds"][layout] if m["type"] == "training_progress"]
    assert [m["current_epoch"] for m in progress] == list(range(1, EPOCHS + 1))
    for message in progress:
        assert {"mAP50", "mAP50-95", "precision", "recall", "train_box_loss", "val_box_loss"} <= set(message["metrics"])

    _poll(lambda: api.get(f"/api/v1/training/jobs/{job['id']}/mlflow/summary").json(),
          lambda s: s.get("found") and s.get("status") == "FINISHED", timeout=60)
    history = api.get(f"/api/v1/training/jobs/{job['id']}/mlflow/metrics").json()["metrics"]
    for name in ("mAP50", "mAP50-95", "precision", "recall", "train_box_loss", "val_cls_loss"):
        assert sorted(point["step"] for point in history[name]) == list(range(1, EPOCHS + 1)), name
    assert not any("(" in name for name in history)
    logs = api.get(f"/api/v1/training/jobs/{job['id']}/logs", params={"limit": 500}).json()
    text = json.dumps(logs)
    assert f"dataset ({layout}, split from layout)" in text and "mosaic=0.0" in text and "optimizer=AdamW" in text


def test_onnx_export_validates_and_inference_returns_boxes(world: dict[str, Any]) -> None:
    api: httpx.Client = world["api"]
    job = world["jobs"]["coco"]
    assert job["status"] == "completed", job
    created = api.post("/api/v1/export/jobs", json={
        "training_job_id": job["id"], "export_format": "onnx",
        "validation_config": {"validate_outputs": True, "tolerance": 1e-4, "num_samples": 2},
    })
    assert created.status_code == 201, created.text
    export = _poll(lambda: api.get(f"/api/v1/export/jobs/{created.json()['id']}").json(),
                   lambda e: e["status"] in TERMINAL)
    assert export["status"] == "completed", export
    assert export["validation_passed"] is True
    results = export["export_results"]
    assert results["max_abs_diff"] <= 1e-4 and results["max_abs_diff_boxes_px"] is not None

    heldout = world["zips"]["coco"].heldout_dir
    images = sorted(heldout.glob("*.png"))[:3]
    uploads = api.post("/api/v1/test_inference/inference/upload-images", params={"training_job_id": job["id"]},
                       files=[("files", (p.name, p.read_bytes(), "image/png")) for p in images]).json()
    created = api.post("/api/v1/test_inference/inference/jobs", json={
        "training_job_id": job["id"], "inference_type": "batch",
        "input_data": {"image_paths_s3": [item["s3_uri"] for item in uploads["uploaded_files"]],
                       "confidence_threshold": 0.001},
    })
    assert created.status_code == 201, created.text
    inference = _poll(lambda: api.get(f"/api/v1/test_inference/inference/jobs/detail/{created.json()['id']}").json(),
                      lambda i: i["status"] in TERMINAL)
    assert inference["status"] == "completed", inference
    rows = api.get(f"/api/v1/test_inference/inference/jobs/{inference['id']}/results",
                   params={"skip": 0, "limit": 10}).json()["results"]
    assert len(rows) == len(images)
    boxes = [box for row in rows for box in row["predicted_boxes"] or []]
    assert boxes, rows
    for box in boxes:
        assert box["label"] in CLASS_NAMES and 0.0 <= box["confidence"] <= 1.0
        assert 0 <= box["x1"] <= box["x2"] <= 64 and 0 <= box["y1"] <= box["y2"] <= 64
