"""The built-in classifier run as a real subprocess with a real SDK pipe, on scikit-learn's digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from visionyard.shared.commands import TrainingConfig
from visionyard.shared.sdk import TrainerJob
from visionyard.trainers.classifier.data import load_imagefolder, stratified_split
from visionyard.trainers.classifier.manifest import MANIFEST

FAST = {"image_size": 16, "seed": 0}


def write_digits(root: Path, *, per_class: int | None = None, classes: int = 10) -> Path:
    """An ImageFolder of 8x8 grayscale digit PNGs."""
    digits = load_digits()
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label >= classes or (per_class is not None and counts.get(label, 0) >= per_class):
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{index}.png")
    return root


def run_trainer(tmp_path: Path, dataset: Path, *, name: str = "run", epochs: int = 3, model: str = "simple_cnn",
                resume: Path | None = None, advanced: dict[str, Any] | None = None) -> tuple[int, list[dict[str, Any]], str, TrainerJob]:
    """Run `python -m visionyard.trainers.classifier` with a job file and a real pipe; return exit, lines, stderr."""
    work = tmp_path / name
    work.mkdir()
    job = TrainerJob(
        job_id="job-1", attempt=1,
        config=TrainingConfig(
            framework="pytorch", model_name=model, task_type="image_classification", dataset_id="ds",
            epochs=epochs, batch_size=32, learning_rate=0.01, advanced_config={**FAST, **(advanced or {})},
        ),
        dataset_dir=dataset, output_dir=work / "output", outbox_dir=work / "outbox", resume_checkpoint=resume,
    )
    job_file = work / "job.json"
    job_file.write_text(job.model_dump_json())
    read_fd, write_fd = os.pipe()
    env = {"PATH": os.environ.get("PATH", ""), "VISIONYARD_JOB_FILE": str(job_file), "VISIONYARD_EVENTS_FD": str(write_fd)}
    with (work / "stderr.txt").open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", MANIFEST.module], cwd=work, env=env, pass_fds=(write_fd,),
                                   stdout=subprocess.DEVNULL, stderr=err)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            lines = [json.loads(line) for line in pipe]
        code = process.wait(timeout=120)
    return code, lines, (work / "stderr.txt").read_text(), job


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


def test_trains_digits_reports_every_epoch_and_leaves_loadable_checkpoints(tmp_path: Path, digits: Path) -> None:
    code, lines, stderr, job = run_trainer(tmp_path, digits, epochs=3)
    assert code == 0, stderr
    progress = [line for line in lines if line["type"] == "progress"]
    assert [p["epoch"] for p in progress] == [1, 2, 3]
    assert set(progress[0]["metrics"]) == {"loss", "accuracy", "train_loss", "train_accuracy", "learning_rate"}
    result = next(line for line in lines if line["type"] == "result")
    assert result["epochs_completed"] == 3
    assert result["best_metrics"]["accuracy"] > 0.8
    checkpoints = [line for line in lines if line["type"] == "checkpoint"]
    assert {c["kind"] for c in checkpoints} == {"last", "best"}
    assert [c["epoch"] for c in checkpoints if c["kind"] == "last"] == [1, 2, 3]
    best = torch.load(checkpoints[-1]["path"] if checkpoints[-1]["kind"] == "best" else job.output_dir / "best.pt",
                      weights_only=False)
    assert best["class_names"] == [f"digit_{i}" for i in range(10)]
    assert best["in_channels"] == 1 and best["image_size"] == 16 and best["num_classes"] == 10
    assert best["epoch"] == result["best_epoch"]
    last = torch.load(Path(checkpoints[0]["path"]), weights_only=False)  # the outbox copy of epoch 1
    assert last["epoch"] == 1 and "model_state" in last and "optimizer_state" in last


def test_resume_continues_at_the_next_epoch(tmp_path: Path, digits: Path) -> None:
    code, lines, stderr, job = run_trainer(tmp_path, digits, name="first", epochs=2)
    assert code == 0, stderr
    code, lines, stderr, _ = run_trainer(tmp_path, digits, name="second", epochs=4, resume=job.output_dir / "last.pt")
    assert code == 0, stderr
    assert [line["epoch"] for line in lines if line["type"] == "progress"] == [3, 4]
    assert any(line["type"] == "log" and line["event_type"] == "resume" for line in lines)
    assert next(line for line in lines if line["type"] == "result")["epochs_completed"] == 4


def test_tiny_resnet_trains(tmp_path: Path) -> None:
    small = write_digits(tmp_path / "small", per_class=30, classes=3)
    code, lines, stderr, _ = run_trainer(tmp_path, small, epochs=1, model="tiny_resnet")
    assert code == 0, stderr
    assert [line["epoch"] for line in lines if line["type"] == "progress"] == [1]


@pytest.mark.parametrize("layout", ["empty", "one_class", "broken_image"])
def test_bad_dataset_exits_2_with_a_clear_message(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    if layout == "one_class":
        write_digits(root, per_class=5, classes=1)
    elif layout == "broken_image":
        write_digits(root, per_class=5, classes=2)
        (root / "digit_0" / "broken.png").write_bytes(b"not a png")
    code, lines, stderr, _ = run_trainer(tmp_path, root, epochs=1)
    assert code == 2
    expected = {"empty": "no images", "one_class": "at least 2 classes", "broken_image": "broken.png"}[layout]
    assert expected in stderr
    assert not any(line["type"] == "progress" for line in lines)


def test_sigterm_saves_last_checkpoint_and_exits_143(tmp_path: Path, digits: Path) -> None:
    work = tmp_path / "term"
    work.mkdir()
    job = TrainerJob(
        job_id="job-t", config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                                              dataset_id="ds", epochs=500, batch_size=8, advanced_config=FAST),
        dataset_dir=digits, output_dir=work / "output", outbox_dir=work / "outbox",
    )
    (work / "job.json").write_text(job.model_dump_json())
    read_fd, write_fd = os.pipe()
    env = {"PATH": os.environ.get("PATH", ""), "VISIONYARD_JOB_FILE": str(work / "job.json"), "VISIONYARD_EVENTS_FD": str(write_fd)}
    process = subprocess.Popen([sys.executable, "-m", MANIFEST.module], env=env, pass_fds=(write_fd,),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_fd)
    lines: list[dict[str, Any]] = []
    with os.fdopen(read_fd) as pipe:
        for raw in pipe:
            lines.append(json.loads(raw))
            if lines[-1]["type"] == "progress":
                process.send_signal(signal.SIGTERM)
                break
        lines.extend(json.loads(raw) for raw in pipe)
    code = process.wait(timeout=60)
    assert code == 143
    last = [line for line in lines if line["type"] == "checkpoint" and line["kind"] == "last"]
    saved = torch.load(last[-1]["path"], weights_only=False)
    assert saved["epoch"] >= 1
    assert not any(line["type"] == "result" for line in lines)


def test_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    labels = np.asarray([0] * 10 + [1] * 5 + [2])
    train_a, val_a = stratified_split(labels, val_split=0.2, seed=7)
    train_b, val_b = stratified_split(labels, val_split=0.2, seed=7)
    assert val_a.tolist() == val_b.tolist() and train_a.tolist() == train_b.tolist()
    assert sorted(labels[val_a].tolist()) == [0, 0, 1]  # 2 of 10, 1 of 5, none of the lone image
    assert len(train_a) + len(val_a) == len(labels)


def test_train_val_folders_and_wrapper_folder_are_understood(tmp_path: Path) -> None:
    root = tmp_path / "wrapped" / "my_dataset"
    write_digits(root / "train", per_class=6, classes=2)
    write_digits(root / "val", per_class=2, classes=2)
    loaded = load_imagefolder(tmp_path / "wrapped", image_size=8, val_split=0.2, seed=0)
    assert loaded.val_from_folder and loaded.class_names == ["digit_0", "digit_1"]
    assert len(loaded.train.labels) == 12 and len(loaded.val.labels) == 4
    assert loaded.in_channels == 1


def test_manifest_describes_the_trainer_without_importing_torch() -> None:
    code = ("import sys; from visionyard.trainers.classifier.manifest import MANIFEST; "
            "assert 'torch' not in sys.modules; print(MANIFEST.model_dump_json())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    manifest = json.loads(out)
    assert manifest["name"] == "pytorch-classifier" and manifest["primary_metric"] == {"image_classification": "accuracy"}
    assert {m["model_name"] for m in manifest["models"]} == {"simple_cnn", "tiny_resnet"}
    fields = {field["name"] for field in manifest["config_schema"]["fields"]}
    assert fields >= {"image_size", "optimizer", "weight_decay", "val_split", "seed", "augment", "lr_schedule"}
    assert manifest["task_types"][0]["name"] == "image_classification" and manifest["dataset_formats"][0]["name"] == "imagefolder"


def test_each_epoch_reports_every_validation_image_consistent_with_its_confusion_matrix(
    tmp_path: Path, digits: Path
) -> None:
    code, lines, stderr, job = run_trainer(tmp_path, digits, epochs=2)
    assert code == 0, stderr
    reports = [line["data"] for line in lines if line["type"] == "log" and line["event_type"] == "validation_result"]
    assert [report["epoch"] for report in reports] == [1, 2]
    classes = reports[0]["class_names"]
    for report in reports:
        images = report["image_results"]
        count = sum(map(sum, report["confusion_matrix"]))
        # Every validation image, once, each a real file of the dataset named relative to it.
        assert images["total"] == count == len(images["images"]) == len(set(images["images"]))
        assert all((job.dataset_dir / path).is_file() for path in images["images"])
        # The true class is the image's folder; rebuilt from the rows, the confusion matrix is the reported one.
        assert all(path.split("/")[0] == classes[true] for path, true in zip(images["images"], images["true"], strict=True))
        rebuilt = [[0] * len(classes) for _ in classes]
        for true, predicted in zip(images["true"], images["predicted"], strict=True):
            rebuilt[true][predicted] += 1
        assert rebuilt == report["confusion_matrix"]
        assert all(0.0 < c <= 1.0 for c in images["confidence"])
        # The misclassified come first.
        wrong = [t != p for t, p in zip(images["true"], images["predicted"], strict=True)]
        assert wrong == sorted(wrong, reverse=True)


def test_a_capped_report_keeps_the_misclassified_and_says_how_many_were_validated(
    tmp_path: Path, digits: Path
) -> None:
    code, lines, stderr, _ = run_trainer(tmp_path, digits, epochs=1, advanced={"validation_images_per_epoch": 5})
    assert code == 0, stderr
    report = next(line["data"] for line in lines if line["type"] == "log" and line["event_type"] == "validation_result")
    images = report["image_results"]
    wrong = sum(map(sum, report["confusion_matrix"])) - sum(report["confusion_matrix"][i][i]
                                                           for i in range(len(report["class_names"])))
    assert len(images["images"]) == 5 and images["total"] == sum(map(sum, report["confusion_matrix"]))
    listed_wrong = sum(t != p for t, p in zip(images["true"], images["predicted"], strict=True))
    assert listed_wrong == min(wrong, 5)
    code, lines, stderr, _ = run_trainer(tmp_path, digits, name="none", epochs=1,
                                         advanced={"validation_images_per_epoch": 0})
    assert code == 0, stderr
    report = next(line["data"] for line in lines if line["type"] == "log" and line["event_type"] == "validation_result")
    assert "image_results" not in report and report["confusion_matrix"]


def test_a_report_of_many_long_paths_stays_small_enough_for_one_event() -> None:
    from visionyard.trainers.classifier.train import IMAGE_RESULTS_BYTES, Evaluation, image_results

    count = 10_000
    paths = [f"val/class_{i % 7}/{'x' * 90}-{i:05d}.png" for i in range(count)]
    labels = [i % 7 for i in range(count)]
    predictions = [label if i % 10 else (label + 1) % 7 for i, label in enumerate(labels)]  # every tenth wrong
    evaluation = Evaluation(loss=0.1, accuracy=0.9, confusion=[], predictions=predictions,
                            confidences=[0.5] * count)
    report = image_results(paths, labels, evaluation, limit=count)
    assert report["total"] == count and 0 < len(report["images"]) < count
    assert len(json.dumps(report)) <= IMAGE_RESULTS_BYTES  # under the broker's 1 MB with room to spare
    listed_wrong = [t != p for t, p in zip(report["true"], report["predicted"], strict=True)]
    assert all(listed_wrong[: count // 10]) or all(listed_wrong)  # the misclassified come first
