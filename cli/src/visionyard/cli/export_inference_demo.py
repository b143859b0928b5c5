"""The demo's last act: export the trained model to ONNX through REST, download the package, run its
own `example.py` on held-out digits, and classify a few more with an inference job."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from visionyard.cli.client import ApiClient

EXAMPLE_IMAGES = 10
INFERENCE_IMAGES = 30


def heldout_images(heldout_dir: Path) -> list[tuple[Path, str]]:
    """(image, true label) of the held-out digits the demo kept out of training."""
    with (heldout_dir / "labels.csv").open(newline="") as handle:
        return [(heldout_dir / row["path"], row["label"]) for row in csv.DictReader(handle)]


def wait_until(client: ApiClient, path: str, *, timeout: float = 300.0) -> dict[str, Any]:
    """Poll `path` until its status is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.request("GET", path)
        if body.get("status") in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def download_package(client: ApiClient, export: dict[str, Any], *, data_dir: Path) -> Path:
    """Download a completed export's package through its presigned URL and unpack it; the directory."""
    url = client.request("GET", f"/api/v1/export/{export['id']}/download")["download_url"]
    package = httpx.get(url, timeout=60)
    package.raise_for_status()
    target = data_dir / "export" / str(export["id"])
    zipfile.ZipFile(io.BytesIO(package.content)).extractall(target)
    return target


def export_and_classify(client: ApiClient, job_id: str | int, *, data_dir: Path, heldout_dir: Path,
                        say: Callable[[str], None]) -> bool:
    """Export to ONNX, run the package's example on held-out digits, run an inference job; whether all worked."""
    job_id = int(job_id)  # job ids are integers on the wire
    export = client.request("POST", "/api/v1/export/jobs", json={
        "training_job_id": job_id, "export_format": "onnx", "export_config": {"opset_version": 17},
        "validation_config": {"validate_outputs": True, "tolerance": 1e-4, "num_samples": 16},
    })
    say(f"export {export['id']}: onnx, version {export['version']}, from {export['checkpoint_path']}")
    export = wait_until(client, f"/api/v1/export/jobs/{export['id']}")
    if export["status"] != "completed":
        say(f"export failed: {export.get('error_message')}")
        return False
    results = export.get("export_results") or {}
    say(f"export completed: validation_passed={export['validation_passed']} "
        f"max_abs_diff={results.get('max_abs_diff'):.2e} (onnxruntime vs PyTorch on {results.get('num_samples')} "
        f"inputs), package {export['file_size_mb']} MB")
    target = download_package(client, export, data_dir=data_dir)
    say(f"downloaded and unpacked the package into {target}: {', '.join(sorted(p.name for p in target.iterdir()))}")
    images = heldout_images(heldout_dir)
    sample = images[:: max(1, len(images) // EXAMPLE_IMAGES)][:EXAMPLE_IMAGES]
    run = subprocess.run([sys.executable, "example.py", *[str(path) for path, _ in sample]], cwd=target,
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        say(f"example.py failed: {run.stderr.strip()[-500:]}")
        return False
    say("the package's example.py (onnxruntime) on held-out digits:")
    correct = 0
    for line, (path, label) in zip(run.stdout.strip().splitlines(), sample, strict=False):
        _, predicted, confidence = line.split("\t")
        correct += predicted == label
        say(f"  {path.name:<16} predicted {predicted} ({float(confidence):.2f})  true {label}"
            f"  {'ok' if predicted == label else 'WRONG'}")
    say(f"  accuracy {correct}/{len(sample)}")

    chosen = images[:INFERENCE_IMAGES]
    files = [("files", (path.name, path.read_bytes(), "image/png")) for path, _ in chosen]
    uploads = client.request("POST", "/api/v1/test_inference/inference/upload-images",
                             params={"training_job_id": job_id}, files=files)
    inference = client.request("POST", "/api/v1/test_inference/inference/jobs", json={
        "training_job_id": job_id, "inference_type": "batch",
        "input_data": {"image_paths_s3": [item["s3_uri"] for item in uploads["uploaded_files"]]},
    })
    inference = wait_until(client, f"/api/v1/test_inference/inference/jobs/detail/{inference['id']}")
    if inference["status"] != "completed":
        say(f"inference failed: {inference.get('error_message')}")
        return False
    page = client.request("GET", f"/api/v1/test_inference/inference/jobs/{inference['id']}/results",
                          params={"skip": 0, "limit": len(chosen)})
    truth = {item["unique_filename"]: label for item, (_, label) in zip(uploads["uploaded_files"], chosen, strict=True)}
    hits = sum(row["predicted_label"] == truth.get(row["image_name"]) for row in page["results"])
    say(f"inference job {inference['id']}: {inference['total_images']} held-out images, "
        f"accuracy {hits}/{len(page['results'])}, avg {inference['avg_inference_time_ms']:.2f} ms per image")
    return True
