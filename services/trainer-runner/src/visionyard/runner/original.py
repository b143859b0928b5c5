"""Launching a trainer directory written for the original platform, unchanged.

Such a trainer is `python train.py --log-level INFO` in its own directory, configured by environment
variables (trainer-contract.md §1–2) and reporting through `from trainer_sdk import TrainerSDK`. The
runner puts its own `trainer_sdk` (runner/compat) first on `PYTHONPATH`, so every SDK call becomes a
pipe record; `CALLBACK_URL` and the storage variables are set only because those trainers check them,
and name nothing reachable: no credential and no address is ever passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from visionyard.shared.commands import StartTraining
from visionyard.shared.manifest import TrainerManifest

COMPAT_SDK_DIR = Path(__file__).resolve().parent / "compat"
# What those trainers require to be non-empty; nothing listens there (the SDK speaks the pipe).
CALLBACK_PLACEHOLDER = "visionyard-pipe://runner/api/v1"

# `report_failed`'s error types → how the runner classifies the job (events.FailureReason values).
USER_ERROR_TYPES = frozenset({"DatasetError", "ConfigError", "ValidationError"})


def original_config(cmd: StartTraining, *, device: str) -> dict[str, Any]:
    """CONFIG as the original backend built it, with the advanced options also at the top level.

    The original nested them under `advanced_config` only, where its Ultralytics trainer never looked
    (mosaic, optimizer, cos_lr, ... were silently ignored); the basic keys win over an advanced key.
    """
    config = cmd.config
    advanced = dict(config.advanced_config or {})
    basic: dict[str, Any] = {
        "epochs": config.epochs,
        "batch": config.batch_size,
        "learning_rate": config.learning_rate,
        "device": device,
        "advanced_config": advanced,
        "primary_metric": config.primary_metric,
        "primary_metric_mode": config.primary_metric_mode,
    }
    if "imgsz" in advanced or "image_size" in advanced:
        basic["imgsz"] = advanced.get("imgsz", advanced.get("image_size"))
    if cmd.dataset.split:
        basic["split_config"] = {"source": "pinned", "paths": cmd.dataset.split}
    return {**advanced, **{key: value for key, value in basic.items() if value is not None}}


def original_command(
    manifest: TrainerManifest,
    cmd: StartTraining,
    *,
    python: str,
    job_file: Path,
    job_dir: Path,
    base_env: dict[str, str],
    device: str = "cpu",
) -> tuple[list[str], Path, dict[str, str]]:
    """(argv, cwd, env): `python train.py --log-level INFO` in the trainer's directory, the original's variables."""
    assert manifest.directory is not None and manifest.entrypoint is not None
    directory = Path(manifest.directory)
    config = cmd.config
    config_json = original_config(cmd, device=device)
    inherited = base_env.get("PYTHONPATH")
    env = {
        **base_env,
        "PYTHONPATH": os.pathsep.join([str(COMPAT_SDK_DIR), *([inherited] if inherited else [])]),
        "PYTHONUNBUFFERED": "1",
        "VISIONYARD_JOB_FILE": str(job_file),
        "JOB_ID": str(cmd.job_id),
        "CALLBACK_URL": CALLBACK_PLACEHOLDER,
        "MODEL_NAME": config.model_name,
        "FRAMEWORK": config.framework,
        "TASK_TYPE": config.task_type,
        "DATASET_ID": config.dataset_id,
        "DATASET_S3_URI": f"s3://training-datasets/datasets/{config.dataset_id}/",
        "SNAPSHOT_ID": cmd.dataset.content_hash,
        "DATASET_VERSION_HASH": cmd.dataset.content_hash,
        "DATASET_CACHE_DIR": str(job_dir / "dataset-cache"),
        "EPOCHS": str(config.epochs),
        "BATCH_SIZE": str(config.batch_size),
        "LEARNING_RATE": str(config.learning_rate),
        "DEVICE": device,
        "CONFIG": json.dumps(config_json),
    }
    if "imgsz" in config_json:
        env["IMGSZ"] = str(config_json["imgsz"])
    return [python, str(directory / manifest.entrypoint), "--log-level", "INFO"], directory, env
