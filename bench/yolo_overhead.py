"""YOLO overhead: a YOLO job through the platform ÷ the same Ultralytics training run standalone.

The standalone run is plain Ultralytics in the ultralytics trainer environment — `YOLO("yolo11n.yaml")
.train(...)` with the same arguments the platform's trainer passes (same data, epochs, image size, batch,
seed, optimizer, no plots, offline settings) — on the dataset already converted to YOLO. The platform run
is the built-in YOLO trainer as a job: from the `start` request to the job row showing `completed`, so it
includes dispatch, the trainer's start-up, converting the staged version, per-epoch reporting, staging
every checkpoint and the final events. Standalone and platform runs alternate; the dataset is staged
(cached by the runner) before the first timed run.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import zipfile
from pathlib import Path

from bench.harness import BenchStack, row, spread
from visionyard.cli.datasets_shapes import build_shapes_dataset
from visionyard.cli.trainer_envs import available

GOAL_RATIO = 1.03
FULL = {"num_images": 150, "image_size": 96, "epochs": 8}
QUICK = {"num_images": 24, "image_size": 64, "epochs": 1}
BATCH = 16

STANDALONE = """
import sys
from pathlib import Path
from visionyard.trainers.yolo import offline
work = Path(sys.argv[1])
offline.configure(work / "ultralytics-config")
from ultralytics import YOLO
YOLO("yolo11n.yaml", task="detect").train(
    data=sys.argv[2], epochs=int(sys.argv[3]), imgsz=int(sys.argv[4]), batch=int(sys.argv[5]), workers=0,
    save_dir=str(work / "runs"), exist_ok=True, plots=False, verbose=False, seed=0, pretrained=False,
    optimizer="auto", mosaic=0.0)
"""


def _advanced(image_size: int) -> dict[str, object]:
    return {"imgsz": image_size, "mosaic": 0.0, "checkpoint_interval_seconds": 10}


def standalone_seconds(python: Path, scratch: Path, data_yaml: Path, *, epochs: int, image_size: int) -> float:
    """Wall time of plain Ultralytics training in the trainer environment."""
    work = scratch / f"standalone-{time.time_ns()}"
    work.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([str(python), "-c", STANDALONE, str(work), str(data_yaml), str(epochs), str(image_size), str(BATCH)],
                   check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(work)})
    return time.perf_counter() - start


def platform_seconds(bench: BenchStack, dataset_id: str, *, epochs: int, image_size: int) -> float:
    """Wall time from the start request to the job row showing completed (polled every 0.1 s)."""
    job_id = bench.create_job({"framework": "ultralytics", "model_name": "yolo11n", "task_type": "object_detection",
                               "dataset_id": dataset_id, "dataset_format": "yolo", "epochs": epochs,
                               "batch_size": BATCH, "learning_rate": 0.01, "advanced_config": _advanced(image_size)})
    start = time.perf_counter()
    bench.start_job(job_id)
    job = bench.wait_jobs([job_id], every=0.1, timeout=1800)[job_id]
    elapsed = time.perf_counter() - start
    if job["status"] != "completed":
        raise RuntimeError(f"YOLO job {job_id} ended {job['status']}: {job.get('error_message')}")
    return elapsed


async def run(scratch: Path, *, quick: bool, runs: int) -> str:
    """Alternate standalone and platform runs of the same YOLO training; the report section."""
    python = available().get("ultralytics")
    if python is None:
        raise RuntimeError("the ultralytics trainer environment is not built: run `make trainer-env`")
    from visionyard.trainers.yolo.datasets import prepare_yolo_dataset

    size = QUICK if quick else FULL
    summary = build_shapes_dataset(scratch / "shapes", num_images=int(size["num_images"]),
                                   image_size=int(size["image_size"]), seed=1)
    staged = scratch / "staged"
    with zipfile.ZipFile(summary.zip_path) as archive:
        archive.extractall(staged)
    prepared = prepare_yolo_dataset(staged, scratch / "yolo")
    epochs, image_size = int(size["epochs"]), int(size["image_size"])
    alone: list[float] = []
    through: list[float] = []
    with BenchStack(scratch / "stack", runners=1, slots=1) as bench:
        bench._wait_for_trainer("ultralytics")
        dataset_id = bench.upload(summary.zip_path, name="shapes")
        # Stages and caches the version, and warms the page cache for the trainer environment's imports.
        await asyncio.to_thread(platform_seconds, bench, dataset_id, epochs=1, image_size=image_size)
        for _ in range(runs):
            alone.append(await asyncio.to_thread(standalone_seconds, python, scratch, prepared.data_yaml,
                                                 epochs=epochs, image_size=image_size))
            through.append(await asyncio.to_thread(platform_seconds, bench, dataset_id, epochs=epochs,
                                                   image_size=image_size))
    ratios = [p / s for p, s in zip(through, alone, strict=True)]
    overhead = [p - s for p, s in zip(through, alone, strict=True)]
    verdict = "meets" if round(statistics.median(ratios), 3) <= GOAL_RATIO else "misses"
    counts = summary.split_counts
    return "\n".join([
        "## YOLO overhead: a YOLO job through the platform vs the same Ultralytics training standalone",
        "",
        f"yolo11n from its YAML on {counts['train']} train / {counts['val']} val synthetic shapes at {image_size} px, "
        f"{epochs} epochs, batch {BATCH}, mosaic 0, CPU; standalone = plain Ultralytics in the ultralytics trainer "
        f"environment on the converted dataset; platform = start request → job completed ({len(alone)} pairs, "
        "alternating).",
        "",
        "| figure | median (min–max) |",
        "|---|---|",
        row("standalone Ultralytics wall time, s (baseline)", spread(alone, "{:.2f}")),
        row("through the platform (start request → completed), s", spread(through, "{:.2f}")),
        row("ratio platform ÷ standalone", spread(ratios, "{:.3f}")),
        row("overhead (platform − standalone), s", spread(overhead, "{:.2f}")),
        "",
        f"Ratio (YOLO platform ÷ standalone): **{statistics.median(ratios):.3f}** (goal ≤ {GOAL_RATIO}): **{verdict}**.",
        "",
    ])

