"""End to end: a trainer directory written for the original platform's SDK, registered with the stack's
runners, appears in the model catalogue and trains a job on an uploaded YOLO zip, with no change to its files."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from PIL import Image

from visionyard.cli.stack import EmbeddedStack
from visionyard.shared.natsserver import free_port

from ..jobproof import poll

pytestmark = pytest.mark.e2e

_SOURCE = Path(__file__).parents[2] / "services" / "trainer-runner" / "tests" / "original_trainer_source.py"
_spec = importlib.util.spec_from_file_location("original_trainer_source", _SOURCE)
assert _spec is not None and _spec.loader is not None
source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(source)


def _digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _yolo_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("data.yaml", "names:\n  0: square\n  1: circle\n")
        for split, count in (("train", 6), ("val", 2)):
            for index in range(count):
                image = io.BytesIO()
                Image.new("RGB", (32, 32), (index * 20, 40, 90)).save(image, format="PNG")
                bundle.writestr(f"images/{split}/{index}.png", image.getvalue())
                bundle.writestr(f"labels/{split}/{index}.txt", f"{index % 2} 0.5 0.5 0.25 0.25\n")
    return buffer.getvalue()


# The shared poll (tests/jobproof.py) with this file's patience.
_poll = partial(poll, timeout=120.0)


@pytest.fixture(scope="module")
def trainer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return source.write_trainer_dir(tmp_path_factory.mktemp("trainers") / "legacy")


@pytest.fixture(scope="module")
def api(trainer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    stack = EmbeddedStack(data_dir=tmp_path_factory.mktemp("stack"), api_port=free_port(), runners=1,
                          extra_env={"VISIONYARD_RUNNER_TRAINER_DIRS": str(trainer_dir)})
    with stack, httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


def test_an_original_trainer_directory_trains_a_job_through_the_stack(api: httpx.Client, trainer_dir: Path) -> None:
    before = _digest(trainer_dir)
    models = _poll(lambda: api.get("/api/v1/models/list", params={"supported_only": "false"}).json(),
                   lambda listed: any(m["model_name"] == "legacy-n" for m in listed), timeout=60)
    legacy = next(m for m in models if m["model_name"] == "legacy-n")
    assert (legacy["framework"], legacy["parameters"]["min"]) == ("legacy-yolo", 1.8)

    dataset_id = api.post("/api/v1/datasets", json={"name": "shapes", "visibility": "private"}).json()["dataset_id"]
    uploaded = api.post(f"/api/v1/datasets/{dataset_id}/upload",
                        files={"file": ("shapes.zip", _yolo_zip(), "application/zip")})
    assert uploaded.status_code == 202, uploaded.text
    dataset = _poll(lambda: api.get(f"/api/v1/datasets/{dataset_id}").json(),
                    lambda d: d["status"] in ("ready", "rejected"))
    assert dataset["status"] == "ready" and dataset["format"] == "yolo", dataset

    body = {"config": {"framework": "legacy-yolo", "model_name": "legacy-n", "task_type": "detection",
                       "dataset_id": dataset_id, "epochs": 2, "advanced_config": {"mosaic": 0.0}}}
    created = api.post("/api/v1/training/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert api.post(f"/api/v1/training/jobs/{job_id}/start").status_code == 200
    final = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}").json(),
                  lambda j: j["status"] in ("completed", "failed", "cancelled"))
    assert final["status"] == "completed", final

    checkpoints = api.get(f"/api/v1/training/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert {c["kind"] for c in checkpoints} == {"best", "last"}
    summary = _poll(lambda: api.get(f"/api/v1/training/jobs/{job_id}/mlflow/summary").json(),
                    lambda s: s.get("found") and s.get("status") == "FINISHED", timeout=60)
    assert summary["run_id"]
    history = api.get(f"/api/v1/training/jobs/{job_id}/mlflow/metrics").json()["metrics"]
    # Epochs 1, 2 and the extra call after the final validation, under a name MLflow accepts.
    assert sorted(point["step"] for point in history["metrics/mAP50_B"]) == [1, 2, 3]
    logs = api.get(f"/api/v1/training/jobs/{job_id}/logs", params={"limit": 500}).json()
    text = str(logs)
    assert "prepared" in text and "'train': 6" in text.replace('"', "'")
    assert _digest(trainer_dir) == before  # no change to its files
