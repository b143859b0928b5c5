#!/usr/bin/env python3
"""Make a finished training job for the original e2e inference script, through the REST API only.

Logs in when the API has /auth/login (else goes without a token, as the original script does),
creates a project when /projects exists, uploads the digits zip, creates and starts a training job
with the body the original frontend sends, waits for it to finish and prints its id on the last line.
Usage: .work/venv/bin/python prep_e2e.py API_URL [--email E --password P] [--dataset ZIP] [--epochs N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Train one job through REST the way the original frontend creates it; print its id last."""
    ap = argparse.ArgumentParser()
    ap.add_argument("api")
    ap.add_argument("--email", default="")
    ap.add_argument("--password", default="")
    ap.add_argument("--dataset", default=str(HERE / ".work" / "data" / "digits.zip"))
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--framework", default="pytorch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    api = a.api.rstrip("/")
    headers: dict[str, str] = {}
    if a.email:
        r = requests.post(f"{api}/auth/login", data={"username": a.email, "password": a.password}, timeout=15)
        print(f"POST /auth/login -> {r.status_code}", file=sys.stderr)
        if r.ok:
            headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    project_id = None
    r = requests.post(f"{api}/projects", json={"name": f"e2e-{time.strftime('%H%M%S')}", "description": None, "task_type": None},
                      headers=headers, timeout=15)
    print(f"POST /projects -> {r.status_code}", file=sys.stderr)
    if r.ok:
        project_id = r.json()["id"]
    r = requests.post(f"{api}/datasets", json={"name": f"e2e-digits-{time.strftime('%H%M%S')}", "visibility": "private"},
                      headers=headers, timeout=15)
    r.raise_for_status()
    body = r.json()
    dataset_id = body.get("dataset_id") or body.get("id")
    with open(a.dataset, "rb") as fh:
        r = requests.post(f"{api}/datasets/{dataset_id}/upload", files={"file": ("digits.zip", fh, "application/zip")},
                          headers=headers, timeout=300)
    print(f"upload -> {r.status_code} {r.text[:200]}", file=sys.stderr)
    r.raise_for_status()
    for _ in range(120):
        d = requests.get(f"{api}/datasets/{dataset_id}", headers=headers, timeout=15).json()
        if d.get("format") and (d.get("num_items") or d.get("num_images") or 0):
            break
        time.sleep(1)
    config = {"framework": a.framework, "model_name": a.model, "task_type": "image_classification",
              "dataset_id": dataset_id, "dataset_format": "imagefolder", "epochs": a.epochs, "batch_size": 32,
              "primary_metric": "accuracy", "primary_metric_mode": "max", "advanced_config": {}}
    job_body = {"config": config}
    if project_id is not None:
        job_body["project_id"] = project_id
    r = requests.post(f"{api}/training/jobs", json=job_body, headers=headers, timeout=30)
    print(f"POST /training/jobs -> {r.status_code} {r.text[:300]}", file=sys.stderr)
    r.raise_for_status()
    job_id = r.json()["id"]
    r = requests.post(f"{api}/training/jobs/{job_id}/start", headers=headers, timeout=30)
    print(f"start -> {r.status_code}", file=sys.stderr)
    r.raise_for_status()
    deadline = time.time() + a.timeout
    status = None
    while time.time() < deadline:
        status = requests.get(f"{api}/training/jobs/{job_id}", headers=headers, timeout=15).json().get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(2)
    print(f"job {job_id} {status}", file=sys.stderr)
    if status != "completed":
        sys.exit(1)
    print(job_id)


if __name__ == "__main__":
    main()
