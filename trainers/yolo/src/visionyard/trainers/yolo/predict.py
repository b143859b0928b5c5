"""Predict entry point the runner spawns: `python -m visionyard.trainers.yolo.predict`.

Runs a stored YOLO checkpoint on the job's images (or every image of a dataset split) and writes
`results.json`. Each row keeps the original platform's shape: `predicted_boxes` is a list of
`{class_id, label, confidence, x1, y1, x2, y2}` in pixels of the original image, plus `polygon`
(`[[x, y], ...]`) for segmentation and `keypoints` (`[[x, y, confidence], ...]`) for pose;
`predicted_label`/`confidence` name the most confident box. An unreadable image gets an error row.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from visionyard.shared.sdk import ENV_JOB_FILE, PredictInput, PredictJob, Reporter
from visionyard.trainers.yolo import offline
from visionyard.trainers.yolo.datasets import IMAGE_SUFFIXES, DatasetLayoutError, prepare_yolo_dataset

EXIT_USER_ERROR = 2
PROGRESS_EVERY = 20
# The API's default threshold (0.0) suits classifiers; for detection it would return every anchor.
DEFAULT_CONFIDENCE = 0.25


class PredictError(Exception):
    """The job cannot be run as asked (the user's request, not a crash)."""


def boxes_of(result: Any, names: dict[int, str]) -> list[dict[str, Any]]:
    """One Ultralytics result as `predicted_boxes` rows, most confident first."""
    rows: list[dict[str, Any]] = []
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return rows
    xyxy = boxes.xyxy.cpu().numpy().tolist()
    classes = boxes.cls.cpu().numpy().astype(int).tolist()
    confidences = boxes.conf.cpu().numpy().tolist()
    polygons = result.masks.xy if getattr(result, "masks", None) is not None else None
    keypoints = result.keypoints.data.cpu().numpy().tolist() if getattr(result, "keypoints", None) is not None else None
    for index, (box, class_id, confidence) in enumerate(zip(xyxy, classes, confidences, strict=True)):
        x1, y1, x2, y2 = (round(float(v), 2) for v in box)
        row: dict[str, Any] = {
            "class_id": class_id, "label": names.get(class_id, str(class_id)),
            "confidence": round(float(confidence), 5), "x1": x1, "y1": y1, "x2": x2, "y2": y2,
            "bbox": [x1, y1, x2, y2],
        }
        if polygons is not None and index < len(polygons):
            row["polygon"] = [[round(float(x), 1), round(float(y), 1)] for x, y in polygons[index].tolist()]
        if keypoints is not None and index < len(keypoints):
            row["keypoints"] = [[round(float(v), 2) for v in point] for point in keypoints[index]]
        rows.append(row)
    rows.sort(key=lambda row: -row["confidence"])
    return rows


def split_inputs(dataset_dir: Path, split: str, work: Path) -> list[PredictInput]:
    """Every image of a dataset split (the layout's own, or a seeded cut), named by its path in the version."""
    try:
        prepared = prepare_yolo_dataset(dataset_dir, work / "data", task="detect")
    except DatasetLayoutError as error:
        raise PredictError(str(error)) from error
    if split not in prepared.files:
        raise PredictError(f"split {split!r} does not exist in the dataset (it has {', '.join(sorted(prepared.files))})")
    return [PredictInput(path=path, name=relative) for relative, path in sorted(prepared.files[split].items())]


def run_predict(job: PredictJob, reporter: Reporter) -> dict[str, Any]:
    """Predict every input and write `results.json`; returns the summary."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    offline.configure(job.output_dir / "ultralytics-config")
    from ultralytics import YOLO

    try:
        model = YOLO(str(job.checkpoint))
    except Exception as error:  # a file that is not a YOLO checkpoint
        raise PredictError(f"cannot load the checkpoint as a YOLO model: {error}") from error
    names = {int(k): str(v) for k, v in model.names.items()}
    inputs = list(job.images)
    if job.dataset_dir is not None:
        inputs += split_inputs(job.dataset_dir, job.split or "val", job.output_dir)
    if not inputs:
        raise PredictError("no images to predict")
    imgsz = int((getattr(model, "overrides", {}) or {}).get("imgsz") or 640)
    confidence = job.confidence_threshold if job.confidence_threshold > 0 else DEFAULT_CONFIDENCE
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(inputs, start=1):
        started = time.perf_counter()
        if item.path.suffix.lower() not in IMAGE_SUFFIXES or not item.path.is_file():
            rows.append(_error_row(item, "not an image file"))
            continue
        try:
            result = model.predict(source=str(item.path), imgsz=imgsz, conf=confidence, verbose=False)[0]
        except Exception as error:  # undecodable image: that row fails, the job goes on
            rows.append(_error_row(item, f"cannot read image: {error}"))
            continue
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        boxes = boxes_of(result, names)
        if getattr(result, "probs", None) is not None:  # a -cls model: labels, no boxes
            probabilities = result.probs.data.cpu().numpy()
            order = probabilities.argsort()[::-1][: job.top_k]
            ranked = [{"label": names[int(i)], "label_id": int(i), "confidence": round(float(probabilities[i]), 6)}
                      for i in order]
        else:
            ranked = [{"label": b["label"], "label_id": b["class_id"], "confidence": b["confidence"]}
                      for b in boxes[: job.top_k]]
        top = ranked[0] if ranked else None
        rows.append({
            "image_name": item.name,
            "predicted_label": top["label"] if top else None,
            "predicted_label_id": top["label_id"] if top else None,
            "confidence": top["confidence"] if top else None,
            "top5_predictions": ranked,
            "predicted_boxes": boxes if getattr(result, "probs", None) is None else None,
            "inference_time_ms": round(elapsed_ms, 3),
            "true_label": item.true_label,
            "image_size": list(result.orig_shape[::-1]),
        })
        if index % PROGRESS_EVERY == 0 or index == len(inputs):
            reporter.progress(index, len(inputs), {"images": float(index)})
    total_ms = sum(row["inference_time_ms"] for row in rows)
    summary: dict[str, Any] = {
        "total_images": len(rows),
        "failed_images": sum(1 for row in rows if row.get("error")),
        "total_detections": sum(len(row.get("predicted_boxes") or []) for row in rows),
        "total_inference_time_ms": round(total_ms, 3),
        "avg_inference_time_ms": round(total_ms / len(rows), 3),
        "class_names": [names[i] for i in sorted(names)],
        "confidence_threshold": confidence,
        "image_size": imgsz,
    }
    job.results_path.write_text(json.dumps({"summary": summary, "results": rows}))
    return summary


def _error_row(item: PredictInput, message: str) -> dict[str, Any]:
    return {"image_name": item.name, "error": message, "predicted_label": None, "predicted_label_id": None,
            "confidence": None, "top5_predictions": [], "predicted_boxes": [], "inference_time_ms": 0.0,
            "true_label": item.true_label}


def main() -> int:
    """Read the job file, predict; exit 0, or 2 for a user error."""
    reporter = Reporter.from_env()
    try:
        job = PredictJob.model_validate_json(Path(os.environ[ENV_JOB_FILE]).read_text())
    except (KeyError, OSError, ValueError) as error:
        print(f"error: cannot read the predict job file: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    try:
        summary = run_predict(job, reporter)
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        reporter.close()
    print(f"predicted {summary['total_images']} images, {summary['total_detections']} boxes "
          f"in {summary['total_inference_time_ms']:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
