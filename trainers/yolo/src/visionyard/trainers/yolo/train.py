"""The YOLO training job: stage the data as YOLO, train with Ultralytics, report every epoch, checkpoint, resume.

Exit codes the runner relies on: 0 success, 2 bad data or config (a user error), 143 stopped by SIGTERM.
The model is built from its YAML (`yolo11n.yaml`, `yolov8s-seg.yaml`, ...); pretrained weights come only
from the runner's weights directory. Every option of `advanced_config` that the manifest declares is
passed to Ultralytics (the original platform nested them where its trainer never looked).
Metric names are MLflow-safe: `metrics/mAP50(B)` is reported as `mAP50`, `metrics/mAP50-95(M)` as
`mask_mAP50-95`, `train/box_loss` as `train_box_loss` (see `metric_name`).
"""

from __future__ import annotations

import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from visionyard.shared.sdk import Reporter, TrainerJob, load_job
from visionyard.trainers.yolo import offline
from visionyard.trainers.yolo.datasets import (
    DatasetLayoutError,
    PreparedYolo,
    prepare_imagefolder,
    prepare_yolo_dataset,
)
from visionyard.trainers.yolo.manifest import CONFIG_SCHEMA, MANIFEST, TASKS, ultralytics_task

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 143
TASK_OF_TYPE = {task_type: task for task_type, task, _ in TASKS.values()}
# Options the runner reads from advanced_config itself; they are not Ultralytics options.
RUNNER_OPTIONS = frozenset({"checkpoint_interval_seconds", "timeout_seconds", "stall_seconds", "device", "gpu_count"})
# Options of the schema that are not passed to Ultralytics' train() as they are.
OWN_OPTIONS = frozenset({"optimizer", "lr0", "pretrained", "val_split", "conf", "iou"})
_SUFFIX_PREFIX = {"B": "", "M": "mask_", "P": "pose_"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


class UserError(Exception):
    """The job cannot be trained as asked (bad config or data): exit 2 with this message."""


class TrainingStopped(Exception):
    """Raised from a callback when SIGTERM arrived, to leave Ultralytics' loop within one batch."""


class StopRequested:
    """Set by SIGTERM/SIGINT; callbacks check it after every batch."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag."""
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


def metric_name(key: str) -> str:
    """An Ultralytics metric key as a name MLflow accepts (no parentheses)."""
    match = re.fullmatch(r"metrics/(.+)\(([A-Z])\)", key)
    if match:
        return _SUFFIX_PREFIX.get(match.group(2), match.group(2).lower() + "_") + match.group(1)
    if key.startswith("lr/pg"):
        return "learning_rate" if key == "lr/pg0" else f"learning_rate_pg{key[5:]}"
    if key.startswith(("train/", "val/")):
        return key.replace("/", "_", 1)
    if key.startswith("metrics/"):
        return _UNSAFE.sub("_", key[len("metrics/"):])
    return _UNSAFE.sub("_", key)


def epoch_metrics(trainer: Any) -> dict[str, float]:
    """Losses, precision, recall, mAP and learning rate of the epoch Ultralytics just validated."""
    raw: dict[str, Any] = {}
    if trainer.tloss is not None:
        raw.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    raw.update(trainer.metrics or {})
    raw.update(getattr(trainer, "lr", None) or {})
    metrics = {metric_name(key): float(value) for key, value in raw.items() if key != "fitness"}
    train_losses = [value for key, value in metrics.items() if key.startswith("train_") and key.endswith("_loss")]
    val_losses = [value for key, value in metrics.items() if key.startswith("val_") and key.endswith("_loss")]
    if train_losses:
        metrics["loss"] = sum(train_losses)
    if val_losses:
        metrics["val_loss"] = sum(val_losses)
    if "accuracy_top1" in metrics:
        metrics["accuracy"] = metrics["accuracy_top1"]  # the platform's classification metric name
    if getattr(trainer, "fitness", None) is not None:
        metrics["fitness"] = float(trainer.fitness)
    return metrics


def _check_option(key: str, value: Any, spec: dict[str, Any]) -> Any:
    where = f"advanced_config.{key}"
    kind = spec.get("type")
    if kind == "boolean":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where} must be a number, got {value!r}")
        if kind == "integer" and int(value) != value:
            raise UserError(f"{where} must be an integer, got {value!r}")
        if "minimum" in spec and value < spec["minimum"]:
            raise UserError(f"{where} must be >= {spec['minimum']}, got {value!r}")
        if "maximum" in spec and value > spec["maximum"]:
            raise UserError(f"{where} must be <= {spec['maximum']}, got {value!r}")
        return int(value) if kind == "integer" else float(value)
    if kind == "string":
        allowed = spec.get("enum")
        if allowed is not None:
            # Ultralytics spells optimizers SGD/AdamW; accept any case.
            by_lower = {str(option).lower(): option for option in allowed}
            if str(value).lower() not in by_lower:
                raise UserError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")
            return by_lower[str(value).lower()]
        return str(value)
    return value


@dataclass(frozen=True)
class YoloParams:
    """The job's config, checked against the manifest, as Ultralytics arguments."""

    model_name: str
    task: str
    epochs: int
    batch: int
    learning_rate: float
    options: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    @classmethod
    def from_job(cls, job: TrainerJob) -> YoloParams:
        """Validate model, task and every advanced option; a bad value is a user error naming the field."""
        config = job.config
        if config.model_name not in MANIFEST.model_names():
            raise UserError(f"model_name {config.model_name!r} is not a YOLO model this trainer offers")
        task = ultralytics_task(config.model_name)
        wanted = TASK_OF_TYPE.get(config.task_type)
        if wanted != task:
            raise UserError(
                f"task_type {config.task_type!r} does not match model_name {config.model_name!r} "
                f"(it trains {next(t for t, u, _ in TASKS.values() if u == task)})"
            )
        properties: dict[str, dict[str, Any]] = CONFIG_SCHEMA["properties"]
        options: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in (config.advanced_config or {}).items():
            if key in RUNNER_OPTIONS:
                continue
            if key not in properties:
                ignored.append(key)
                continue
            if value is None:
                continue
            options[key] = _check_option(key, value, properties[key])
        return cls(model_name=config.model_name, task=task, epochs=config.epochs, batch=config.batch_size,
                   learning_rate=config.learning_rate, options=options, ignored=tuple(sorted(ignored)))

    def train_arguments(self, *, data: str, save_dir: Path, weights: Path | None) -> dict[str, Any]:
        """Keyword arguments for `YOLO.train` (a fresh run)."""
        arguments: dict[str, Any] = {
            "data": data, "epochs": self.epochs, "batch": self.batch, "imgsz": 640, "workers": 0,
            "save_dir": str(save_dir), "exist_ok": True, "plots": False, "verbose": False, "seed": 0,
            "pretrained": str(weights) if weights else False,
        }
        for key, value in self.options.items():
            if key not in OWN_OPTIONS:
                arguments[key] = value
        optimizer = self.options.get("optimizer", "auto")
        arguments["optimizer"] = optimizer
        if optimizer != "auto":
            # With `auto` Ultralytics picks its own optimizer and lr0 and ignores lr0; a chosen one uses ours.
            arguments["lr0"] = self.options.get("lr0", self.learning_rate)
        return arguments


def resolve_weights(params: YoloParams) -> Path | None:
    """Local pretrained weights for the model: required when `pretrained` is true, used when present if unset."""
    wanted = params.options.get("pretrained")
    if wanted is False:
        return None
    found = offline.local_weights(params.model_name)
    if wanted and found is None:
        directory = offline.weights_dir()
        where = f"{directory / (params.model_name + '.pt')}" if directory else f"{offline.WEIGHTS_DIR_VARIABLE} (unset)"
        raise UserError(f"advanced_config.pretrained is true but there are no local weights at {where}; "
                        "nothing is downloaded")
    return found


class EpochReporter:
    """Ultralytics callbacks → SDK progress, checkpoints and the final result."""

    def __init__(self, reporter: Reporter, stop: StopRequested) -> None:
        self.reporter = reporter
        self.stop = stop
        self.last_metrics: dict[str, float] = {}
        self.best_metrics: dict[str, float] = {}
        self.final_metrics: dict[str, float] = {}
        self.best_epoch: int | None = None
        self.completed_epoch = 0
        self.total_epochs = 0
        self.last_checkpoint: Path | None = None
        self.best_checkpoint: Path | None = None
        self.started = time.perf_counter()

    def attach(self, model: Any) -> None:
        """Register the callbacks on a YOLO model."""
        model.add_callback("on_train_batch_end", self.on_batch_end)
        model.add_callback("on_train_epoch_start", self.on_batch_end)
        model.add_callback("on_model_save", self.on_model_save)
        model.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_batch_end(self, trainer: Any) -> None:
        """Leave the loop within one batch of a SIGTERM."""
        if self.stop.requested:
            raise TrainingStopped

    def on_model_save(self, trainer: Any) -> None:
        """Ultralytics wrote last.pt (and best.pt when this epoch is the best): declare them."""
        epoch = trainer.epoch + 1
        self.last_checkpoint = Path(trainer.last)
        self.reporter.checkpoint(trainer.last, kind="last", epoch=epoch)
        if trainer.best_fitness is not None and trainer.fitness == trainer.best_fitness:
            self.best_checkpoint = Path(trainer.best)
            self.best_epoch = epoch
            self.reporter.checkpoint(trainer.best, kind="best", epoch=epoch)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        """Report the epoch; the extra call after training (best.pt re-validated) gives the best metrics."""
        epoch = trainer.epoch + 1
        self.total_epochs = trainer.epochs
        metrics = epoch_metrics(trainer)
        if epoch > trainer.epochs:
            self.final_metrics = {k: v for k, v in metrics.items() if not k.startswith(("train_", "learning_rate"))}
            return
        self.completed_epoch = epoch
        self.last_metrics = metrics
        if self.best_epoch == epoch:
            self.best_metrics = dict(metrics)
        metrics = {**metrics, "epoch_seconds": float(getattr(trainer, "epoch_time", 0.0) or 0.0)}
        self.reporter.progress(epoch, trainer.epochs, metrics)


def _resumable(path: Path) -> bool:
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return int(checkpoint.get("epoch", -1)) >= 0 and checkpoint.get("optimizer") is not None


def prepare_data(job: TrainerJob, params: YoloParams, work: Path) -> PreparedYolo:
    """The staged version as a YOLO dataset under `work/data` (the job's pinned split honoured)."""
    try:
        return prepare_yolo_dataset(
            job.dataset_dir, work / "data", task=params.task, split=job.split,
            val_fraction=float(params.options.get("val_split", 0.2)), seed=int(params.options.get("seed", 0)),
        )
    except DatasetLayoutError as error:
        raise UserError(str(error)) from error


def prepare_classify_data(job: TrainerJob, params: YoloParams, work: Path) -> PreparedYolo:
    """The staged ImageFolder version as `work/data/{train,val}/<class>/` (the job's pinned split honoured)."""
    try:
        return prepare_imagefolder(
            job.dataset_dir, work / "data", split=job.split,
            val_fraction=float(params.options.get("val_split", 0.2)), seed=int(params.options.get("seed", 0)),
        )
    except DatasetLayoutError as error:
        raise UserError(str(error)) from error


def train(job: TrainerJob, reporter: Reporter, stop: StopRequested) -> int:
    """Run the job to completion (0) or until stopped (143); raises `UserError` for bad input."""
    params = YoloParams.from_job(job)
    work = job.output_dir
    work.mkdir(parents=True, exist_ok=True)
    offline.configure(work / "ultralytics-config")
    if params.task == "classify":
        prepared = prepare_classify_data(job, params, work)
        data = str(prepared.root)
    else:
        prepared = prepare_data(job, params, work)
        data = str(prepared.data_yaml)
    reporter.log(
        f"dataset ({prepared.source_format}, split from {prepared.split_source}): "
        + ", ".join(f"{split} {count}" for split, count in prepared.counts.items())
        + f"; classes {', '.join(prepared.class_names)}"
        + (f"; {prepared.skipped} annotations unusable for {params.task} skipped" if prepared.skipped else ""),
        event_type="dataset",
        data={"class_names": prepared.class_names, "counts": prepared.counts, "format": prepared.source_format,
              "split_source": prepared.split_source},
    )
    if params.ignored:
        reporter.log(f"advanced_config keys not used by the YOLO trainer: {', '.join(params.ignored)}",
                     level="WARNING", event_type="config")

    from ultralytics import YOLO

    save_dir = work / "runs" / "train"
    epochs = EpochReporter(reporter, stop)
    if job.resume_checkpoint is not None and _resumable(job.resume_checkpoint):
        model = YOLO(str(job.resume_checkpoint))
        epochs.attach(model)
        reporter.log(f"resuming from the stored last checkpoint (epoch {job.resume_epoch})", event_type="resume",
                     data={"epoch": job.resume_epoch})
        arguments: dict[str, Any] = {"resume": str(job.resume_checkpoint), "data": data,
                                     "save_dir": str(save_dir), "workers": params.options.get("workers", 0)}
    else:
        if job.resume_checkpoint is not None:
            reporter.log("the stored checkpoint holds no optimizer state; training from the start", level="WARNING",
                         event_type="resume")
        weights = resolve_weights(params)
        model = YOLO(f"{params.model_name}.yaml", task=params.task)
        epochs.attach(model)
        arguments = params.train_arguments(data=data, save_dir=save_dir, weights=weights)
        reporter.log(
            f"training {params.model_name} ({params.task}) from {'local weights ' + str(weights) if weights else 'scratch'}"
            f" for {params.epochs} epochs; options: "
            + ", ".join(f"{key}={arguments[key]}" for key in sorted(arguments) if key not in ("data", "save_dir")),
            event_type="config", data={k: v for k, v in arguments.items() if k not in ("data", "save_dir")},
        )
    try:
        model.train(**arguments)
    except TrainingStopped:
        print(f"stopped by signal after epoch {epochs.completed_epoch}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    best = save_dir / "weights" / "best.pt"
    if best.is_file():
        # After training Ultralytics strips the optimizer from best.pt: the file export and predict use.
        reporter.checkpoint(best, kind="best", epoch=epochs.best_epoch)
    reporter.result(
        final_metrics=epochs.last_metrics,
        best_metrics=epochs.final_metrics or epochs.best_metrics,
        best_epoch=epochs.best_epoch,
        epochs_completed=epochs.completed_epoch,
    )
    return 0


def main() -> int:
    """Console entry: load the job, train, map bad input to exit 2."""
    stop = StopRequested()
    stop.install()
    try:
        job = load_job()
    except Exception as error:
        print(f"error: cannot read the job file: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    reporter = Reporter.from_env(outbox_dir=job.outbox_dir)
    try:
        return train(job, reporter, stop)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        reporter.log(str(error), level="ERROR", event_type="user_error")
        return EXIT_USER_ERROR
    finally:
        reporter.close()
