"""The training loop: read the job, train and validate each epoch, report, checkpoint, resume, stop on SIGTERM.

Exit codes the runner relies on: 0 success, 2 bad data or config (a user error), 143 stopped by SIGTERM
after saving `last.pt`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from visionyard.shared.sdk import Reporter, TrainerJob, load_job
from visionyard.trainers.classifier.data import (
    DatasetError,
    LoadedDataset,
    channel_stats,
    load_imagefolder,
    to_channels,
)
from visionyard.trainers.classifier.models import BACKBONES, MODEL_NAMES, build_model, load_pretrained, local_weights

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 143
# The per-image part of one epoch's validation report: well under NATS's default 1 MB message limit.
IMAGE_RESULTS_BYTES = 256 * 1024


class StopRequested:
    """Set by SIGTERM/SIGINT; the loop checks it after every batch so it stops within one batch."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Route SIGTERM and SIGINT to this flag."""
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


@dataclass(frozen=True)
class Hyperparameters:
    """Everything the loop needs from the job's config and advanced_config."""

    model_name: str
    epochs: int
    batch_size: int
    learning_rate: float
    num_classes: int | None
    image_size: int
    optimizer: str
    weight_decay: float
    val_split: float
    seed: int
    augment: bool
    lr_schedule: str
    hflip: bool = False
    pretrained: bool | None = None
    # Per-image validation results reported per epoch (the validation tab's image views); 0 reports none.
    validation_images: int = 2000

    @classmethod
    def from_job(cls, job: TrainerJob) -> Hyperparameters:
        """Validate the config; a bad value is a user error naming the field."""
        config = job.config
        advanced: dict[str, Any] = dict(config.advanced_config or {})
        try:
            params = cls(
                model_name=config.model_name,
                epochs=config.epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                num_classes=config.num_classes,
                image_size=int(advanced.get("image_size", 32)),
                optimizer=str(advanced.get("optimizer", "adam")).lower(),
                weight_decay=float(advanced.get("weight_decay", 0.0)),
                val_split=float(advanced.get("val_split", 0.2)),
                seed=int(advanced.get("seed", 42)),
                augment=bool(advanced.get("augment", False)),
                lr_schedule=str(advanced.get("lr_schedule", "cosine")).lower(),
                hflip=bool(advanced.get("hflip", False)),
                pretrained=None if advanced.get("pretrained") is None else bool(advanced["pretrained"]),
                validation_images=int(advanced.get("validation_images_per_epoch", 2000)),
            )
        except (TypeError, ValueError) as error:
            raise DatasetError(f"advanced_config: {error}") from error
        if params.model_name not in MODEL_NAMES:
            raise DatasetError(f"model_name {params.model_name!r} unknown; choose one of {', '.join(MODEL_NAMES)}")
        if params.optimizer not in ("adam", "sgd"):
            raise DatasetError(f"advanced_config.optimizer must be adam or sgd, got {params.optimizer!r}")
        if not 8 <= params.image_size <= 512:
            raise DatasetError(f"advanced_config.image_size must be within 8..512, got {params.image_size}")
        if not 0.0 <= params.val_split < 1.0:
            raise DatasetError(f"advanced_config.val_split must be within [0, 1), got {params.val_split}")
        if params.weight_decay < 0:
            raise DatasetError(f"advanced_config.weight_decay must be >= 0, got {params.weight_decay}")
        if not 0 <= params.validation_images <= 10_000:
            raise DatasetError(f"advanced_config.validation_images_per_epoch must be within 0..10000, "
                               f"got {params.validation_images}")
        if params.lr_schedule not in ("constant", "cosine"):
            raise DatasetError(f"advanced_config.lr_schedule must be constant or cosine, got {params.lr_schedule!r}")
        return params

    def learning_rate_at(self, epoch: int) -> float:
        """Learning rate of a 1-based epoch; recomputed from the epoch so a resumed run matches."""
        if self.lr_schedule == "cosine" and self.epochs > 1:
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / self.epochs))
        return self.learning_rate


def _shift_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Shifts of up to 1/8 of the side keep the object in frame for centred datasets like digits.
    pad = max(1, batch.shape[-1] // 8)
    padded = nn.functional.pad(batch, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + batch.shape[-2], dx : dx + batch.shape[-1]]


def _evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, num_classes: int
) -> Evaluation:
    """Validation loss, accuracy, the confusion matrix (rows: true class, columns: predicted) and each
    image's predicted class and its softmax confidence."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.long)
    predictions: list[int] = []
    confidences: list[float] = []
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])
            target = labels[start : start + batch_size]
            total_loss += float(criterion(logits, target))
            scores, predicted = torch.softmax(logits, dim=1).max(dim=1)
            correct += int((predicted == target).sum())
            confusion += torch.bincount(target * num_classes + predicted, minlength=num_classes**2).view(
                num_classes, num_classes
            )
            predictions += predicted.tolist()
            confidences += scores.tolist()
    count = max(len(labels), 1)
    return Evaluation(total_loss / count, correct / count, confusion.tolist(), predictions, confidences)


@dataclass(frozen=True)
class Evaluation:
    """One pass over the validation images."""

    loss: float
    accuracy: float
    confusion: list[list[int]]
    predictions: list[int]
    confidences: list[float]


def image_results(
    paths: list[str], labels: list[int], evaluation: Evaluation, *, limit: int
) -> dict[str, Any]:
    """Each validation image's true and predicted class and confidence, as aligned arrays (compact on the wire).

    At most `limit` images are listed, and no more than fit in IMAGE_RESULTS_BYTES (the report travels in one
    event, under the broker's message size): the misclassified ones first (what a reviewer looks for), then
    the rest in dataset order; `total` says how many were validated.
    """
    order: list[int] = []
    budget = IMAGE_RESULTS_BYTES
    for index in sorted(range(len(paths)), key=lambda i: (labels[i] == evaluation.predictions[i], i))[: max(limit, 0)]:
        budget -= len(paths[index].encode()) + 32  # the path, quoted, and its three numbers
        if budget < 0:
            break
        order.append(index)
    return {
        "total": len(paths),
        "images": [paths[i] for i in order],
        "true": [labels[i] for i in order],
        "predicted": [evaluation.predictions[i] for i in order],
        "confidence": [round(evaluation.confidences[i], 5) for i in order],
    }


def validation_result(epoch: int, class_names: list[str], confusion: list[list[int]]) -> dict[str, Any]:
    """One epoch's per-class precision/recall/F1 and confusion matrix, as the platform's validation views read them."""
    per_class = []
    for index, name in enumerate(class_names):
        true_positive = confusion[index][index]
        predicted = sum(row[index] for row in confusion)
        support = sum(confusion[index])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class_name": name, "precision": precision, "recall": recall, "f1_score": f1,
                          "support": support})
    return {"epoch": epoch, "task_type": "image_classification", "class_names": class_names,
            "confusion_matrix": confusion, "per_class_metrics": per_class}


def _save(path: Path, state: dict[str, Any]) -> None:
    # Write then rename, so a SIGKILL mid-save never leaves a truncated checkpoint behind.
    partial = path.with_name(path.name + ".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def train(job: TrainerJob, reporter: Reporter, stop: StopRequested) -> int:
    """Run the job to completion (0) or until stopped (143); raises `DatasetError` for bad input."""
    params = Hyperparameters.from_job(job)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.manual_seed(params.seed)

    resume: dict[str, Any] | None = None
    if job.resume_checkpoint is not None:
        resume = torch.load(job.resume_checkpoint, map_location="cpu", weights_only=False)
    image_size = int(resume["image_size"]) if resume else params.image_size
    weights = None
    if params.model_name in BACKBONES and not resume and params.pretrained is not False:
        weights = local_weights(params.model_name)
        if params.pretrained and weights is None:
            raise DatasetError(f"advanced_config.pretrained is true but there are no local weights for "
                               f"{params.model_name} in VISIONYARD_RUNNER_WEIGHTS_DIR; nothing is downloaded")
    dataset: LoadedDataset = load_imagefolder(
        job.dataset_dir,
        image_size=image_size,
        val_split=params.val_split,
        seed=params.seed,
        # Pretrained backbones were trained on RGB: keep three channels even for grayscale data.
        in_channels=int(resume["in_channels"]) if resume else (3 if weights else None),
        split=job.split,
    )
    if resume and list(resume["class_names"]) != dataset.class_names:
        raise DatasetError(f"checkpoint classes {resume['class_names']} differ from the dataset's {dataset.class_names}")
    num_classes = params.num_classes or len(dataset.class_names)
    if resume:
        num_classes = int(resume["num_classes"])
    if num_classes < len(dataset.class_names):
        raise DatasetError(f"num_classes={num_classes} but the dataset has {len(dataset.class_names)} classes")
    if len(dataset.train.labels) == 0:
        raise DatasetError("the training split is empty")

    train_x = torch.from_numpy(to_channels(dataset.train.images, dataset.in_channels))
    val_x = torch.from_numpy(to_channels(dataset.val.images, dataset.in_channels))
    if resume:
        mean, std = list(resume["normalization"]["mean"]), list(resume["normalization"]["std"])
    else:
        mean, std = channel_stats(train_x.numpy())
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    train_x = (train_x - mean_t) / std_t
    val_x = (val_x - mean_t) / std_t
    train_y = torch.from_numpy(dataset.train.labels)
    val_y = torch.from_numpy(dataset.val.labels)
    val_files = dataset.val.paths
    if len(val_y) == 0:
        # No held-out images (val_split=0 or tiny classes): validate on the training set, and say so.
        reporter.log("no validation images; validation metrics are computed on the training set", level="WARNING")
        val_x, val_y, val_files = train_x, train_y, dataset.train.paths
    # Paths inside the dataset version (what storage indexes its files by), for the per-image views.
    val_paths = [Path(path).relative_to(job.dataset_dir).as_posix() for path in val_files]

    model = build_model(params.model_name, in_channels=dataset.in_channels, num_classes=num_classes)
    if weights is not None:
        skipped = load_pretrained(model, weights)
        reporter.log(f"initialised {params.model_name} from local weights {weights.name}"
                     + (f" (not loaded: {', '.join(skipped)})" if skipped else ""), event_type="pretrained")
    optimizer: torch.optim.Optimizer
    if params.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=params.learning_rate, momentum=0.9, weight_decay=params.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)

    start_epoch = 1
    best_accuracy = -1.0
    best_epoch: int | None = None
    best_metrics: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    if resume:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        start_epoch = int(resume["epoch"]) + 1
        saved = resume.get("metrics") or {}
        best_accuracy = float(saved.get("best_accuracy", -1.0))
        best_epoch = saved.get("best_epoch")
        best_metrics = dict(saved.get("best_metrics") or {})
        last_metrics = dict(saved.get("last_metrics") or {})
        print(f"resumed from {job.resume_checkpoint} at epoch {start_epoch}", flush=True)
        reporter.log(f"resumed from epoch {int(resume['epoch'])}", event_type="resume", data={"epoch": int(resume["epoch"])})

    reporter.log(
        f"training {params.model_name} on {len(train_y)} images ({len(val_y)} for validation), "
        f"{len(dataset.class_names)} classes, {dataset.in_channels} channel(s), {image_size}px",
        event_type="dataset",
        data={"class_names": dataset.class_names, "train": len(train_y), "val": len(val_y)},
    )

    job.output_dir.mkdir(parents=True, exist_ok=True)
    last_path = job.output_dir / "last.pt"
    best_path = job.output_dir / "best.pt"
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(params.seed)
    completed_epoch = start_epoch - 1

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "epoch": epoch,
            "class_names": dataset.class_names,
            "model_name": params.model_name,
            "num_classes": num_classes,
            "image_size": image_size,
            "in_channels": dataset.in_channels,
            "normalization": {"mean": mean, "std": std},
            "metrics": {
                "last_metrics": last_metrics,
                "best_metrics": best_metrics,
                "best_accuracy": best_accuracy,
                "best_epoch": best_epoch,
            },
        }

    def save_last_and_stop() -> int:
        # The partial epoch's updates are kept, but the epoch is recorded as the last completed one,
        # so a resume repeats it rather than skipping it.
        _save(last_path, checkpoint_state(completed_epoch))
        reporter.checkpoint(last_path, kind="last", epoch=completed_epoch)
        print(f"stopped by signal after epoch {completed_epoch}; saved {last_path}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED

    for epoch in range(start_epoch, params.epochs + 1):
        if stop.requested:
            return save_last_and_stop()
        learning_rate = params.learning_rate_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        for start in range(0, len(order), params.batch_size):
            index = order[start : start + params.batch_size]
            batch, target = train_x[index], train_y[index]
            if params.augment:
                batch = _shift_augment(batch, generator)
            if params.hflip:
                flip = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            optimizer.zero_grad(set_to_none=True)
            logits = model(batch)
            loss = criterion(logits, target)
            loss.backward()
            optimizer.step()
            seen += len(target)
            loss_sum += loss.item() * len(target)
            correct += int((logits.argmax(1) == target).sum())
            if stop.requested:
                return save_last_and_stop()
        evaluation = _evaluate(model, val_x, val_y, max(params.batch_size, 256), num_classes)
        val_loss, val_accuracy = evaluation.loss, evaluation.accuracy
        names = list(dataset.class_names) + [f"class_{index}" for index in range(len(dataset.class_names), num_classes)]
        result = validation_result(epoch, names, evaluation.confusion)
        if params.validation_images and len(val_paths) == len(evaluation.predictions):
            result["image_results"] = image_results(val_paths, val_y.tolist(), evaluation,
                                                    limit=params.validation_images)
        reporter.log(f"epoch {epoch}: validation accuracy {val_accuracy:.4f}", event_type="validation_result",
                     data=result)
        last_metrics = {
            "loss": val_loss,
            "accuracy": val_accuracy,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "learning_rate": learning_rate,
        }
        improved = val_accuracy > best_accuracy
        if improved:
            best_accuracy, best_epoch, best_metrics = val_accuracy, epoch, dict(last_metrics)
        completed_epoch = epoch
        reporter.progress(epoch, params.epochs, last_metrics)
        _save(last_path, checkpoint_state(epoch))
        reporter.checkpoint(last_path, kind="last", epoch=epoch)
        if improved:
            _save(best_path, checkpoint_state(epoch))
            reporter.checkpoint(best_path, kind="best", epoch=epoch)

    reporter.result(
        final_metrics=last_metrics,
        best_metrics=best_metrics,
        best_epoch=best_epoch,
        epochs_completed=completed_epoch,
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
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        reporter.log(str(error), level="ERROR", event_type="user_error")
        return EXIT_USER_ERROR
    finally:
        reporter.close()


