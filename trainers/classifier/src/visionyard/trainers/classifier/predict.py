"""Predict entry point the runner spawns: `python -m visionyard.trainers.classifier.predict`.

Classifies the job's images (or every image of a dataset split, whose folder names are the true
labels) with a stored checkpoint and writes `results.json`: per image the predicted label and id,
confidence, top-k and the time it took, plus totals. An unreadable image gets an error row rather
than failing the whole job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from visionyard.shared.sdk import ENV_JOB_FILE, PredictInput, PredictJob, Reporter
from visionyard.trainers.classifier.data import IMAGE_SUFFIXES, find_root
from visionyard.trainers.classifier.inference_model import (
    CheckpointError,
    ImageError,
    InferenceModel,
    load_inference_model,
)

EXIT_USER_ERROR = 2
PROGRESS_EVERY = 50


class PredictError(Exception):
    """The job cannot be run as asked (the user's request, not a crash)."""


def split_inputs(dataset_dir: Path, split: str) -> list[PredictInput]:
    """Every image of `<root>/<split>/<class>/*` with its class as the true label."""
    # An archive may wrap everything in one top folder; the split sits at the top or just below it.
    candidates = [dataset_dir / split, find_root(dataset_dir) / split,
                  *(child / split for child in sorted(dataset_dir.iterdir()) if child.is_dir())]
    split_dir = next((path for path in candidates if path.is_dir()), dataset_dir / split)
    root = split_dir.parent
    if not split_dir.is_dir():
        root = find_root(dataset_dir)
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise PredictError(f"split {split!r} does not exist in the dataset (it has {', '.join(available)})")
    inputs: list[PredictInput] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                inputs.append(PredictInput(path=path, name=f"{split}/{class_dir.name}/{path.name}",
                                           true_label=class_dir.name))
    return inputs


def classify(loaded: InferenceModel, item: PredictInput, *, top_k: int, threshold: float) -> dict[str, Any]:
    """One image's result row (API.md field names), with its wall time in ms."""
    started = time.perf_counter()
    try:
        batch = loaded.preprocess([item.path])
    except ImageError as error:
        return {"image_name": item.name, "error": str(error), "predicted_label": None, "predicted_label_id": None,
                "confidence": None, "top5_predictions": [], "predicted_boxes": None, "inference_time_ms": 0.0,
                "true_label": item.true_label}
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(batch), dim=1)[0]
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    k = min(top_k, probabilities.numel())
    values, indices = torch.topk(probabilities, k)
    top = [{"label": loaded.label_of(int(i)), "label_id": int(i), "confidence": round(float(v), 6)}
           for v, i in zip(values, indices, strict=True)]
    best = top[0]
    confident = best["confidence"] >= threshold
    return {
        "image_name": item.name,
        "predicted_label": best["label"] if confident else None,
        "predicted_label_id": best["label_id"] if confident else None,
        "confidence": best["confidence"],
        "top5_predictions": top,
        "predicted_boxes": None,
        "inference_time_ms": round(elapsed_ms, 3),
        "true_label": item.true_label,
    }


def run_predict(job: PredictJob, reporter: Reporter) -> dict[str, Any]:
    """Classify every input and write `results.json`; returns the summary."""
    torch.set_num_threads(1)
    loaded = load_inference_model(job.checkpoint)
    inputs = list(job.images)
    if job.dataset_dir is not None:
        inputs += split_inputs(job.dataset_dir, job.split or "val")
    if not inputs:
        raise PredictError("no images to classify")
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(inputs, start=1):
        rows.append(classify(loaded, item, top_k=job.top_k, threshold=job.confidence_threshold))
        if index % PROGRESS_EVERY == 0 or index == len(inputs):
            reporter.progress(index, len(inputs), {"images": float(index)})
    total_ms = sum(row["inference_time_ms"] for row in rows)
    labelled = [row for row in rows if row["true_label"] is not None and row["predicted_label"] is not None]
    summary: dict[str, Any] = {
        "total_images": len(rows),
        "failed_images": sum(1 for row in rows if row.get("error")),
        "total_inference_time_ms": round(total_ms, 3),
        "avg_inference_time_ms": round(total_ms / len(rows), 3),
        "class_names": loaded.class_names,
        "accuracy": (sum(row["predicted_label"] == row["true_label"] for row in labelled) / len(labelled))
        if labelled else None,
    }
    job.output_dir.mkdir(parents=True, exist_ok=True)
    job.results_path.write_text(json.dumps({"summary": summary, "results": rows}))
    return summary


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
    except (PredictError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        reporter.close()
    print(f"classified {summary['total_images']} images in {summary['total_inference_time_ms']:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
