"""`visionyard demo --task detection`: train a YOLO detector through the platform on synthetic shapes.

Starts an EmbeddedStack (its runner uses the ultralytics trainer environment `make trainer-env` built),
generates a YOLO-format zip of shapes on textured backgrounds, uploads it, trains yolo11n while showing
the per-epoch mAP from the WebSocket, exports to ONNX (validated against PyTorch) and runs the package's
example, runs an inference job on the held-out images (never uploaded for training) and prints their
mAP50 — computed here from the returned boxes against the generator's labels — with a few predictions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from visionyard.cli.client import ApiClient, ApiError, ApiUnreachable
from visionyard.cli.dataset_upload import describe_dataset, upload_dataset
from visionyard.cli.datasets_shapes import build_shapes_dataset
from visionyard.cli.demo import ServiceDied, watch_while_stack_alive
from visionyard.cli.export_inference_demo import download_package, wait_until
from visionyard.cli.stack import EmbeddedStack, StackError
from visionyard.cli.trainer_envs import available
from visionyard.cli.training import create_and_start_job, wait_for_job
from visionyard.shared.natsserver import free_port

# Generous: on a 2-core machine shared with other work the 25 epochs took over 15 minutes (README).
JOB_TIMEOUT = 3600.0
# Measured (README): 300 images at 128 px, 25 epochs of yolo11n reach mAP50 > 0.9 on the held-out split.
DEFAULT_EPOCHS = 25
NUM_IMAGES = 300
IMAGE_SIZE = 128
SHOWN_PREDICTIONS = 5


def _iou(box: Sequence[float], others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def mean_average_precision_50(
    predictions: dict[str, list[tuple[int, float, list[float]]]],
    truths: dict[str, list[tuple[int, list[float]]]],
    num_classes: int,
) -> float:
    """mAP at IoU 0.5 (all-point interpolated AP per class, averaged over classes that have objects)."""
    precisions: list[float] = []
    for class_id in range(num_classes):
        gt = {name: np.array([b for c, b in boxes if c == class_id], dtype=float).reshape(-1, 4)
              for name, boxes in truths.items()}
        total = sum(len(boxes) for boxes in gt.values())
        if total == 0:
            continue
        ranked = sorted(((conf, name, box) for name, rows in predictions.items() for c, conf, box in rows
                         if c == class_id), key=lambda item: -item[0])
        used = {name: np.zeros(len(boxes), bool) for name, boxes in gt.items()}
        hits = np.zeros(len(ranked))
        for index, (_, name, box) in enumerate(ranked):
            candidates = gt.get(name, np.zeros((0, 4)))
            if len(candidates):
                overlaps = _iou(box, candidates)
                best = int(overlaps.argmax())
                if overlaps[best] >= 0.5 and not used[name][best]:
                    used[name][best] = True
                    hits[index] = 1
        true_positives = np.cumsum(hits)
        recall = true_positives / total
        precision = true_positives / np.arange(1, len(ranked) + 1)
        # Precision envelope, then the area under the stepwise precision/recall curve.
        recall = np.concatenate([[0.0], recall, [1.0]])
        precision = np.concatenate([[1.0], precision, [0.0]])
        precision = np.flip(np.maximum.accumulate(np.flip(precision)))
        steps = np.flatnonzero(recall[1:] != recall[:-1])
        precisions.append(float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1])))
    return float(np.mean(precisions)) if precisions else 0.0


def run_detection_demo(*, data_dir: Path | None = None, epochs: int = DEFAULT_EPOCHS, keep: bool = False,
                       out: TextIO = sys.stdout) -> int:
    """Run the detection demo; 0 when training, export and inference all worked."""
    started = time.monotonic()
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="visionyard-detect-")) if data_dir is None else Path(data_dir)

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    if "ultralytics" not in available():
        say("the ultralytics trainer environment is not built: run `make trainer-env` (once; about 6 GB)")
        return 1
    stack = EmbeddedStack(data_dir=root, api_port=free_port(), echo=lambda line: say(f"  {line}"))
    try:
        say(f"Visionyard detection demo: data directory {stack.data_dir}")
        stack.start()
        say(f"stack ready: API {stack.api_url}  docs {stack.docs_url}  MLflow {stack.tracking_uri}")
        summary = build_shapes_dataset(stack.data_dir / "shapes", num_images=NUM_IMAGES, image_size=IMAGE_SIZE)
        say(f"built a synthetic YOLO dataset ({', '.join(summary.class_names)} on textured backgrounds, "
            f"{IMAGE_SIZE}px): {summary.split_counts['train']} train / {summary.split_counts['val']} val images in "
            f"{summary.zip_path}; {summary.split_counts['test']} held-out images in {summary.heldout_dir}")
        with ApiClient(stack.api_url) as client:
            upload = upload_dataset(client, summary.zip_path, name="shapes", description="synthetic shapes (YOLO)")
            if not upload.ready:
                say(f"dataset rejected: {upload.reason}")
                return 1
            say(describe_dataset(upload.dataset))
            config = {"framework": "ultralytics", "model_name": "yolo11n", "task_type": "object_detection",
                      "dataset_id": upload.dataset_id, "dataset_format": "yolo", "epochs": epochs, "batch_size": 16,
                      "learning_rate": 0.01, "advanced_config": {"imgsz": IMAGE_SIZE, "mosaic": 0.0}}
            job = create_and_start_job(client, config, experiment_name="visionyard-detection-demo")
            job_id = str(job["id"])
            say(f"training job {job_id}: ultralytics / yolo11n / object_detection, {epochs} epochs at {IMAGE_SIZE}px")
            train_started = time.monotonic()
            asyncio.run(watch_while_stack_alive(stack, job_id, out=out, timeout=JOB_TIMEOUT))
            job = wait_for_job(client, job_id, timeout=max(JOB_TIMEOUT - (time.monotonic() - started), 30.0))
            say(f"job {job_id} is {job.get('status')} after {time.monotonic() - train_started:.0f}s"
                + (f": {job.get('error_message')}" if job.get("error_message") else ""))
            if job.get("status") != "completed":
                return 1
            latest = client.get_mlflow_summary(job_id).get("latest_metrics") or {}
            say("last epoch's validation metrics (MLflow): " + ", ".join(
                f"{key}={latest[key]:.3f}" for key in ("mAP50", "mAP50-95", "precision", "recall") if key in latest))
            succeeded = _export(client, job_id, data_dir=stack.data_dir, heldout=summary.heldout_dir, say=say)
            succeeded = _heldout_map(client, job_id, summary.heldout_dir, len(summary.class_names), say=say) and succeeded
        say(f"total wall time: {time.monotonic() - started:.1f}s")
        return 0 if succeeded else 1
    except (StackError, ApiError, ApiUnreachable, ServiceDied, TimeoutError, ConnectionError) as error:
        say(f"demo failed: {error}")
        say(f"service logs: {stack.logs_dir}")
        return 1
    finally:
        stack.stop()
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"kept data directory {root}")


def _export(client: ApiClient, job_id: str, *, data_dir: Path, heldout: Path, say: Callable[[str], None]) -> bool:
    export = client.request("POST", "/api/v1/export/jobs", json={
        "training_job_id": job_id, "export_format": "onnx", "export_config": {"opset_version": 17},
        "validation_config": {"validate_outputs": True, "tolerance": 1e-4, "num_samples": 4},
    })
    export = wait_until(client, f"/api/v1/export/jobs/{export['id']}")
    if export["status"] != "completed":
        say(f"export failed: {export.get('error_message')}")
        return False
    results = export.get("export_results") or {}
    say(f"ONNX export {export['id']}: validation_passed={export['validation_passed']}, onnxruntime vs PyTorch max "
        f"difference {results.get('max_abs_diff_boxes_px', float('nan')):.2e} px on boxes, "
        f"{results.get('max_abs_diff_scores', float('nan')):.2e} on scores, package {export['file_size_mb']} MB")
    target = download_package(client, export, data_dir=data_dir)
    trainer_python = available()["ultralytics"]
    images = sorted(heldout.glob("*.png"))[:2]
    run = subprocess.run([str(trainer_python), "example.py", *map(str, images)], cwd=target, capture_output=True,
                         text=True, timeout=120)
    if run.returncode != 0:
        say(f"the package's example.py failed: {run.stderr.strip()[-500:]}")
        return False
    say("the package's example.py (onnxruntime + numpy) on two held-out images:")
    for line in run.stdout.strip().splitlines()[:8]:
        say(f"  {Path(line.split(':')[0]).name}:{line.split(':', 1)[1]}")
    return True


def _heldout_map(client: ApiClient, job_id: str, heldout: Path, num_classes: int, *,
                 say: Callable[[str], None]) -> bool:
    labels = json.loads((heldout / "labels.json").read_text())
    entries = labels["images"]
    files = [("files", (entry["file"], (heldout / entry["file"]).read_bytes(), "image/png")) for entry in entries]
    uploads = client.request("POST", "/api/v1/test_inference/inference/upload-images",
                             params={"training_job_id": job_id}, files=files)
    inference = client.request("POST", "/api/v1/test_inference/inference/jobs", json={
        "training_job_id": job_id, "inference_type": "batch",
        # A low threshold keeps the low-confidence tail that mAP integrates over.
        "input_data": {"image_paths_s3": [item["s3_uri"] for item in uploads["uploaded_files"]],
                       "confidence_threshold": 0.001},
    })
    inference = wait_until(client, f"/api/v1/test_inference/inference/jobs/detail/{inference['id']}")
    if inference["status"] != "completed":
        say(f"inference failed: {inference.get('error_message')}")
        return False
    rows: list[dict[str, Any]] = []
    while len(rows) < len(entries):
        page = client.request("GET", f"/api/v1/test_inference/inference/jobs/{inference['id']}/results",
                              params={"skip": len(rows), "limit": 100})
        if not page["results"]:
            break
        rows += page["results"]
    original = {item["unique_filename"]: item["original_filename"] for item in uploads["uploaded_files"]}
    predictions = {original.get(row["image_name"], row["image_name"]): [
        (int(box["class_id"]), float(box["confidence"]), [box["x1"], box["y1"], box["x2"], box["y2"]])
        for box in row.get("predicted_boxes") or []] for row in rows}
    truths = {entry["file"]: [(int(obj["class_id"]), obj["box"]) for obj in entry["objects"]] for entry in entries}
    score = mean_average_precision_50(predictions, truths, num_classes)
    say(f"inference job {inference['id']}: {len(rows)} held-out images, avg {inference['avg_inference_time_ms']:.1f} ms "
        f"per image; held-out mAP50 = {score:.3f}")
    say("predictions (confidence >= 0.25) next to the true boxes:")
    for entry in entries[:SHOWN_PREDICTIONS]:
        found = [p for p in predictions.get(entry["file"], []) if p[1] >= 0.25]
        shown = "; ".join(f"{labels['class_names'][c]} {conf:.2f} [{', '.join(f'{v:.0f}' for v in box)}]"
                          for c, conf, box in found) or "nothing"
        true = "; ".join(f"{obj['class_name']} [{', '.join(f'{v:.0f}' for v in obj['box'])}]" for obj in entry["objects"])
        say(f"  {entry['file']}: predicted {shown}")
        say(f"  {' ' * len(entry['file'])}  true      {true}")
    return True
