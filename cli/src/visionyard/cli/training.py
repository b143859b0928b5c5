"""Create and start training jobs through REST, and wait for the job row to settle."""

from __future__ import annotations

import time
from typing import Any

from visionyard.cli.client import ApiClient

TERMINAL_JOB_STATUSES = frozenset({"completed", "failed", "cancelled"})


def training_config(*, dataset_id: str, model: str = "simple_cnn", epochs: int = 5, batch_size: int = 32,
                    learning_rate: float = 0.001, framework: str = "pytorch",
                    task_type: str = "image_classification") -> dict[str, Any]:
    """The `config` body of POST /training/jobs."""
    return {
        "framework": framework,
        "model_name": model,
        "task_type": task_type,
        "dataset_id": dataset_id,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }


def create_and_start_job(client: ApiClient, config: dict[str, Any], *,
                         experiment_name: str | None = None, priority: str | int | None = None) -> dict[str, Any]:
    """POST /jobs then /jobs/{id}/start; the started job."""
    job = client.create_job(config=config, experiment_name=experiment_name, priority=priority)
    return client.start_job(str(job["id"]))


def wait_for_job(client: ApiClient, job_id: str, *, timeout: float = 600.0,
                 poll_interval: float = 0.5) -> dict[str, Any]:
    """Poll GET /jobs/{id} until completed, failed or cancelled (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if job.get("status") in TERMINAL_JOB_STATUSES:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still '{job.get('status')}' after {timeout:.0f}s")
        time.sleep(poll_interval)
