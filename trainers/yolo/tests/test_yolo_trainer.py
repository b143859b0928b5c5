"""The YOLO trainer: manifest without torch, MLflow-safe metric names, options applied, and real Ultralytics
runs in the trainer environment (offline: in a network namespace with no interface up when the machine
allows it) — SIGTERM stops with a checkpoint, a new attempt resumes from it, export validates, predict
returns boxes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from visionyard.cli import trainer_envs
from visionyard.cli.datasets_shapes import build_shapes_dataset
from visionyard.shared.commands import TrainingConfig
from visionyard.shared.sdk import ExportJob, PredictInput, PredictJob, TrainerJob


def _job(tmp_path: Path, dataset: Path, **config: Any) -> TrainerJob:
    fields: dict[str, Any] = {"framework": "ultralytics", "model_name": "yolo11n", "task_type": "object_detection",
                              "dataset_id": "d", "epochs": 2, "batch_size": 8}
    fields.update(config)
    return TrainerJob(job_id="7", config=TrainingConfig(**fields), dataset_dir=dataset,
                      output_dir=tmp_path / "output", outbox_dir=tmp_path / "outbox")


# -- in the services' environment (no torch, no Ultralytics) ------------------------------------------------


def test_manifest_and_trainer_modules_import_without_torch_or_ultralytics() -> None:
    code = ("import sys, visionyard.trainers.yolo.manifest, visionyard.trainers.yolo.train, "
            "visionyard.trainers.yolo.predict, visionyard.trainers.yolo.export; "
            "from visionyard.shared.manifest import installed_manifests; "
            "names = {m.name for m in installed_manifests()}; "
            "assert 'ultralytics-yolo' in names, names; "
            "assert not {'torch', 'ultralytics'} & set(sys.modules), 'heavy import'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_metric_names_have_no_parentheses_and_mlflow_accepts_them() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    from visionyard.trainers.yolo.train import metric_name

    mapped = {key: metric_name(key) for key in (
        "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)",
        "metrics/mAP50(M)", "metrics/mAP50-95(P)", "train/box_loss", "val/seg_loss", "lr/pg0", "lr/pg2")}
    assert mapped == {
        "metrics/precision(B)": "precision", "metrics/recall(B)": "recall", "metrics/mAP50(B)": "mAP50",
        "metrics/mAP50-95(B)": "mAP50-95", "metrics/mAP50(M)": "mask_mAP50", "metrics/mAP50-95(P)": "pose_mAP50-95",
        "train/box_loss": "train_box_loss", "val/seg_loss": "val_seg_loss", "lr/pg0": "learning_rate",
        "lr/pg2": "learning_rate_pg2",
    }
    for name in mapped.values():
        _validate_metric_name(name)
    with pytest.raises(MlflowException):
        _validate_metric_name("metrics/mAP50(B)")  # why the mapping exists


def test_advanced_options_are_checked_and_passed_to_ultralytics(tmp_path: Path) -> None:
    from visionyard.trainers.yolo.train import UserError, YoloParams

    params = YoloParams.from_job(_job(tmp_path, tmp_path, learning_rate=0.02, advanced_config={
        "mosaic": 0.0, "optimizer": "sgd", "cos_lr": True, "imgsz": 96, "mixup": 0.1, "stall_seconds": 60,
        "my_own_key": 1}))
    arguments = params.train_arguments(data="d.yaml", save_dir=tmp_path, weights=None)
    assert arguments["mosaic"] == 0.0 and arguments["cos_lr"] is True and arguments["imgsz"] == 96
    assert arguments["optimizer"] == "SGD" and arguments["lr0"] == 0.02 and arguments["mixup"] == 0.1
    assert "stall_seconds" not in arguments and params.ignored == ("my_own_key",)
    assert "lr0" not in YoloParams.from_job(_job(tmp_path, tmp_path)).train_arguments(
        data="d", save_dir=tmp_path, weights=None)  # optimizer auto: Ultralytics picks lr0 itself
    for bad, field in (({"mosaic": 2}, "advanced_config.mosaic"), ({"optimizer": "lion"}, "advanced_config.optimizer"),
                       ({"cos_lr": "yes"}, "advanced_config.cos_lr"), ({"imgsz": 64.5}, "advanced_config.imgsz")):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            YoloParams.from_job(_job(tmp_path, tmp_path, advanced_config=bad))
    with pytest.raises(UserError, match="task_type 'instance_segmentation' does not match model_name 'yolo11n'"):
        YoloParams.from_job(_job(tmp_path, tmp_path, task_type="instance_segmentation"))


# -- in the ultralytics trainer environment ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_python() -> Path:
    """The ultralytics environment's interpreter (built by `make trainer-env`)."""
    found = trainer_envs.available().get("ultralytics")
    if found is None:
        pytest.fail("the ultralytics trainer environment is not built: run `make trainer-env`")
    return found


def _offline_prefix() -> list[str]:
    # A new network namespace has only a loopback that is down: any download attempt fails at once.
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True) if shutil.which("unshare") else None
    return ["unshare", "--net"] if probe is not None and probe.returncode == 0 else []


def _spawn(python: Path, module: str, job_file: Path, *, weights: Path | None = None) -> subprocess.Popen[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "VISIONYARD_JOB_FILE": str(job_file), "PYTHONUNBUFFERED": "1"}
    if weights is not None:
        env["VISIONYARD_RUNNER_WEIGHTS_DIR"] = str(weights)
    return subprocess.Popen([*_offline_prefix(), str(python), "-m", module], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith('{"type"')]


@pytest.fixture(scope="module")
def trained(trainer_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 3-epoch job on a COCO zip, stopped by SIGTERM after its first epoch, then resumed to the end."""
    root = tmp_path_factory.mktemp("yolo")
    summary = build_shapes_dataset(root / "build", num_images=30, image_size=64, layout="coco", seed=5)
    staged = root / "staged"
    with zipfile.ZipFile(summary.zip_path) as bundle:
        bundle.extractall(staged)
    options = {"imgsz": 64, "mosaic": 0.0, "optimizer": "AdamW", "cos_lr": True, "close_mosaic": 0}
    first = _job(root / "attempt1", staged, epochs=3, advanced_config=options)
    first_file = root / "attempt1.json"
    first_file.write_text(first.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo", first_file)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if '"type":"progress"' in line:  # epoch 1 reported, its checkpoints declared before it
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    stopped = process.wait(timeout=300)
    last = [r for r in _records(lines) if r["type"] == "checkpoint" and r["kind"] == "last"][-1]

    second = first.model_copy(update={"attempt": 2, "output_dir": root / "attempt2" / "output",
                                      "outbox_dir": root / "attempt2" / "outbox",
                                      "resume_checkpoint": Path(last["path"]), "resume_epoch": last["epoch"]})
    second_file = root / "attempt2.json"
    second_file.write_text(second.model_dump_json())
    resumed = _spawn(trainer_python, "visionyard.trainers.yolo", second_file)
    out, _ = resumed.communicate(timeout=600)
    yield {"root": root, "staged": staged, "summary": summary, "stopped": stopped, "first": _records(lines),
           "resumed_code": resumed.returncode, "resumed": _records(out.splitlines()), "resumed_out": out,
           "save_dir": second.output_dir / "runs" / "train"}


def test_sigterm_stops_after_a_checkpoint_and_the_next_attempt_resumes(trained: dict[str, Any]) -> None:
    assert trained["stopped"] == 143
    first_epochs = [r["epoch"] for r in trained["first"] if r["type"] == "progress"]
    assert first_epochs == [1]
    assert trained["resumed_code"] == 0, trained["resumed_out"][-3000:]
    resumed = trained["resumed"]
    assert [r["epoch"] for r in resumed if r["type"] == "progress"] == [2, 3]
    assert any(r["type"] == "log" and r["event_type"] == "resume" for r in resumed)
    result = next(r for r in resumed if r["type"] == "result")
    assert result["epochs_completed"] == 3
    for record in [r for r in resumed if r["type"] == "progress"]:
        assert {"mAP50", "mAP50-95", "precision", "recall", "train_box_loss", "val_box_loss", "loss"} <= set(record["metrics"])
        assert not any("(" in key or ")" in key for key in record["metrics"])
    assert {r["kind"] for r in resumed if r["type"] == "checkpoint"} == {"last", "best"}
    # The options reached Ultralytics (and resume kept them from the checkpoint).
    args = (trained["save_dir"] / "args.yaml").read_text()
    for expected in ("mosaic: 0.0", "optimizer: AdamW", "cos_lr: true", "imgsz: 64", "plots: false"):
        assert expected in args, args


def test_pretrained_true_without_local_weights_is_a_user_error(trainer_python: Path, trained: dict[str, Any],
                                                                tmp_path: Path) -> None:
    job = _job(tmp_path, trained["staged"], advanced_config={"pretrained": True, "imgsz": 64})
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo", job_file, weights=tmp_path / "weights")
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2, out
    assert "advanced_config.pretrained is true but there are no local weights at" in out
    assert "nothing is downloaded" in out


def test_onnx_export_validates_against_pytorch_and_predict_returns_boxes(trainer_python: Path,
                                                                         trained: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    best = trained["save_dir"] / "weights" / "best.pt"
    export = ExportJob(export_id="e", training_job_id="7", checkpoint=best, output_dir=tmp_path / "export",
                       export_format="onnx", model_name="yolo11n", task_type="object_detection",
                       validation_config={"tolerance": 1e-4, "num_samples": 2})
    export_file = tmp_path / "export.json"
    export_file.write_text(export.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo.export", export_file)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    result = json.loads(export.result_path.read_text())
    assert result["validation_passed"] is True and result["max_abs_diff"] <= 1e-4
    assert result["max_abs_diff_boxes_px"] is not None and result["input_shape"] == ["batch", 3, 64, 64]
    with zipfile.ZipFile(export.package_path) as package:
        assert sorted(package.namelist()) == ["example.py", "metadata.json", "model.onnx"]

    heldout = sorted(trained["summary"].heldout_dir.glob("*.png"))[:2]
    predict = PredictJob(inference_id="i", training_job_id="7", checkpoint=best, output_dir=tmp_path / "predict",
                         images=[PredictInput(path=p, name=p.name) for p in heldout], dataset_dir=trained["staged"],
                         split="val", confidence_threshold=0.001)
    predict_file = tmp_path / "predict.json"
    predict_file.write_text(predict.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo.predict", predict_file)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    document = json.loads(predict.results_path.read_text())
    rows = document["results"]
    assert len(rows) == 2 + trained["summary"].split_counts["val"]
    boxes = [box for row in rows for box in row["predicted_boxes"]]
    assert boxes, "a low threshold must return boxes"
    for box in boxes:
        assert set(box) >= {"class_id", "label", "confidence", "x1", "y1", "x2", "y2"}
        assert 0 <= box["x1"] <= box["x2"] <= 64 and 0 <= box["y1"] <= box["y2"] <= 64
        assert box["label"] in ("circle", "square", "triangle")


def test_segmentation_trains_on_coco_polygons_and_predicts_masks(trainer_python: Path, tmp_path: Path) -> None:
    summary = build_shapes_dataset(tmp_path / "build", num_images=20, image_size=64, layout="coco", segment=True, seed=2)
    staged = tmp_path / "staged"
    with zipfile.ZipFile(summary.zip_path) as bundle:
        bundle.extractall(staged)
    job = _job(tmp_path, staged, model_name="yolo11n-seg", task_type="instance_segmentation", epochs=1,
               advanced_config={"imgsz": 64, "mosaic": 0.0})
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo", job_file)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    progress = [r for r in _records(out.splitlines()) if r["type"] == "progress"]
    assert {"mask_mAP50", "mask_mAP50-95", "train_seg_loss", "mAP50"} <= set(progress[0]["metrics"])

    best = job.output_dir / "runs" / "train" / "weights" / "best.pt"
    images = sorted(summary.heldout_dir.glob("*.png"))[:2]
    predict = PredictJob(inference_id="s", training_job_id="7", checkpoint=best, output_dir=tmp_path / "predict",
                         images=[PredictInput(path=p, name=p.name) for p in images], confidence_threshold=0.001)
    predict_file = tmp_path / "predict.json"
    predict_file.write_text(predict.model_dump_json())
    process = _spawn(trainer_python, "visionyard.trainers.yolo.predict", predict_file)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    boxes = [box for row in json.loads(predict.results_path.read_text())["results"] for box in row["predicted_boxes"]]
    assert boxes and all(len(box["polygon"]) >= 3 for box in boxes)
    assert all(0 <= x <= 64 and 0 <= y <= 64 for box in boxes for x, y in box["polygon"])
