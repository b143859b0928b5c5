"""The trainer SDK: how a training process reports to the runner that spawned it.

The runner passes a pipe (`VISIONYARD_EVENTS_FD`) and a job file (`VISIONYARD_JOB_FILE`). The SDK
writes one JSON object per line to the pipe; the runner stamps each with `seq`/`attempt` and
publishes it. Trainers need no network and no credentials. Run standalone (no pipe), the SDK
prints the same lines to stderr, so a trainer works the same outside the platform.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, Field

from visionyard.shared.commands import TrainingConfig

ENV_EVENTS_FD = "VISIONYARD_EVENTS_FD"
ENV_JOB_FILE = "VISIONYARD_JOB_FILE"


class TrainerJob(BaseModel):
    """What the runner hands a trainer: config, where the data is, where to write, what to resume."""

    job_id: str
    attempt: int = 1
    config: TrainingConfig
    dataset_dir: Path
    output_dir: Path
    outbox_dir: Path
    resume_checkpoint: Path | None = None
    resume_epoch: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    # `{"train": [...], "val": [...], "test"?: [...]}` paths relative to `dataset_dir`, when the
    # dataset version has a configured split; None means the trainer decides (folders or val_split).
    split: dict[str, list[str]] | None = None


def load_job(path: str | os.PathLike[str] | None = None) -> TrainerJob:
    """Read the job file the runner wrote (or the one named)."""
    job_file = path or os.environ.get(ENV_JOB_FILE)
    if not job_file:
        raise RuntimeError(f"no job file: pass a path or set {ENV_JOB_FILE}")
    return TrainerJob.model_validate_json(Path(job_file).read_text())


class Reporter:
    """Reports progress, logs, checkpoints and the result as JSON lines."""

    def __init__(self, sink: IO[str], *, outbox_dir: Path | None = None) -> None:
        self._sink = sink
        self._outbox = outbox_dir
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, *, outbox_dir: Path | None = None) -> Reporter:
        """The pipe the runner passed, or stderr when run standalone."""
        fd = os.environ.get(ENV_EVENTS_FD)
        if fd is None:
            return cls(sys.stderr, outbox_dir=outbox_dir)
        return cls(os.fdopen(int(fd), "w", buffering=1, encoding="utf-8"), outbox_dir=outbox_dir)

    def _emit(self, record: dict[str, Any]) -> None:
        record["ts"] = time.time()
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._sink.write(line + "\n")
            self._sink.flush()

    def progress(
        self,
        epoch: int,
        total_epochs: int,
        metrics: dict[str, float] | None = None,
        *,
        step: int | None = None,
    ) -> None:
        """One epoch done, with its metrics (loss, accuracy, val_accuracy, learning_rate, ...)."""
        clean = {key: float(value) for key, value in (metrics or {}).items()}
        self._emit(
            {"type": "progress", "epoch": epoch, "total_epochs": total_epochs, "step": step, "metrics": clean}
        )

    def log(
        self, message: str, *, level: str = "INFO", event_type: str = "log", data: dict[str, Any] | None = None
    ) -> None:
        """A log line the user sees in the job's logs and on the WebSocket."""
        self._emit({"type": "log", "message": message, "level": level, "event_type": event_type, "data": data})

    def checkpoint(self, path: str | os.PathLike[str], *, kind: str = "last", epoch: int | None = None) -> None:
        """Declare a checkpoint; it is copied aside first so the trainer may overwrite `path` at once."""
        source = Path(path)
        target = source
        if self._outbox is not None:
            self._outbox.mkdir(parents=True, exist_ok=True)
            target = self._outbox / f"{uuid.uuid4().hex}-{kind}{source.suffix}"
            shutil.copyfile(source, target)
        self._emit({"type": "checkpoint", "kind": kind, "path": str(target), "epoch": epoch})

    def result(
        self,
        *,
        final_metrics: dict[str, float],
        best_metrics: dict[str, float] | None = None,
        best_epoch: int | None = None,
        epochs_completed: int | None = None,
    ) -> None:
        """The final outcome, reported once before a successful exit."""
        self._emit(
            {
                "type": "result",
                "final_metrics": {k: float(v) for k, v in final_metrics.items()},
                "best_metrics": {k: float(v) for k, v in (best_metrics or {}).items()},
                "best_epoch": best_epoch,
                "epochs_completed": epochs_completed,
            }
        )

    def close(self) -> None:
        """Close the pipe (stderr is left open)."""
        if self._sink is not sys.stderr:
            self._sink.close()


class ExportJob(BaseModel):
    """What the runner hands an exporter: a checkpoint, the format and how to validate it."""

    export_id: str
    training_job_id: str
    checkpoint: Path
    output_dir: Path
    export_format: str
    framework: str = ""
    model_name: str = ""
    task_type: str = ""
    export_config: dict[str, Any] = Field(default_factory=dict)
    validation_config: dict[str, Any] = Field(default_factory=dict)

    @property
    def package_path(self) -> Path:
        """Where the exporter writes the package zip."""
        return self.output_dir / "package.zip"

    @property
    def result_path(self) -> Path:
        """Where the exporter writes its result JSON (validation, shapes, sizes)."""
        return self.output_dir / "export_result.json"


class PredictInput(BaseModel):
    """One image to classify: a local file and the name results show for it."""

    path: Path
    name: str
    true_label: str | None = None


class PredictJob(BaseModel):
    """What the runner hands a predictor: a checkpoint, images (or a dataset split), where to write."""

    inference_id: str
    training_job_id: str
    checkpoint: Path
    output_dir: Path
    images: list[PredictInput] = Field(default_factory=list)
    dataset_dir: Path | None = None
    split: str | None = None
    top_k: int = 5
    confidence_threshold: float = 0.0

    @property
    def results_path(self) -> Path:
        """Where the predictor writes the per-image results JSON."""
        return self.output_dir / "results.json"
