"""Export and predict entry points run as real subprocesses on a checkpoint trained on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from visionyard.shared.commands import TrainingConfig
from visionyard.shared.sdk import ExportJob, PredictInput, PredictJob, TrainerJob
from visionyard.trainers.classifier.manifest import MANIFEST


def _run_module(module: str, job_json: str, work: Path) -> tuple[int, list[dict[str, Any]], str]:
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "job.json"
    job_file.write_text(job_json)
    read_fd, write_fd = os.pipe()
    env = {"PATH": os.environ.get("PATH", ""), "VISIONYARD_JOB_FILE": str(job_file), "VISIONYARD_EVENTS_FD": str(write_fd)}
    with (work / "stderr.txt").open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", module], cwd=work, env=env, pass_fds=(write_fd,),
                                   stdout=subprocess.DEVNULL, stderr=err)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            lines = [json.loads(line) for line in pipe]
        code = process.wait(timeout=180)
    return code, lines, (work / "stderr.txt").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A simple_cnn trained 3 epochs on 90% of the digits; the other 10% kept as held-out PNGs."""
    root = tmp_path_factory.mktemp("trained")
    digits = load_digits()
    heldout: list[tuple[Path, str]] = []
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        target = root / ("heldout" if index % 10 == 0 else "dataset") / str(label)
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{index}.png"
        Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(path)
        if index % 10 == 0:
            heldout.append((path, str(label)))
    job = TrainerJob(
        job_id="job-1",
        config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                              dataset_id="ds", epochs=3, batch_size=32, learning_rate=0.01,
                              advanced_config={"image_size": 16, "seed": 0}),
        dataset_dir=root / "dataset", output_dir=root / "train" / "output", outbox_dir=root / "train" / "outbox",
    )
    code, lines, stderr = _run_module(MANIFEST.module, job.model_dump_json(), root / "train")
    assert code == 0, stderr
    result = next(line for line in lines if line["type"] == "result")
    return {"checkpoint": job.output_dir / "best.pt", "heldout": heldout, "root": root,
            "val_accuracy": result["best_metrics"]["accuracy"]}


def _export(trained: dict[str, Any], tmp_path: Path, export_format: str, **config: Any) -> tuple[int, ExportJob, str]:
    job = ExportJob(export_id="exp-1", training_job_id="job-1", checkpoint=trained["checkpoint"],
                    output_dir=tmp_path / "out", export_format=export_format, framework="pytorch",
                    task_type="image_classification", export_config=config,
                    validation_config={"validate_outputs": True, "tolerance": 1e-4, "num_samples": 16})
    code, _, stderr = _run_module(MANIFEST.export_module or "", job.model_dump_json(), tmp_path)
    return code, job, stderr


def test_onnx_export_matches_pytorch_and_its_example_classifies_heldout_digits(trained: dict[str, Any], tmp_path: Path) -> None:
    code, job, stderr = _export(trained, tmp_path, "onnx", opset_version=17)
    assert code == 0, stderr
    result = json.loads(job.result_path.read_text())
    assert result["validation_passed"] is True
    assert result["max_abs_diff"] <= 1e-4
    package = tmp_path / "package"
    with zipfile.ZipFile(job.package_path) as archive:
        assert set(archive.namelist()) == {"model.onnx", "metadata.json", "example.py"}
        archive.extractall(package)
    metadata = json.loads((package / "metadata.json").read_text())
    assert metadata["format"] == "onnx" and metadata["class_names"] == [str(i) for i in range(10)]
    assert metadata["input"]["shape"] == ["batch", 1, 16, 16] and metadata["output"]["shape"] == ["batch", 10]
    model = onnx.load(str(package / "model.onnx"))
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # The example runs outside the platform, with only onnxruntime, Pillow and numpy.
    sample = trained["heldout"][:30]
    output = subprocess.run([sys.executable, "example.py", *[str(path) for path, _ in sample]], cwd=package,
                            capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert output.returncode == 0, output.stderr
    predicted = [line.split("\t")[1] for line in output.stdout.strip().splitlines()]
    accuracy = np.mean([p == label for p, (_, label) in zip(predicted, sample, strict=True)])
    assert accuracy >= 0.8, output.stdout


def test_torchscript_export_matches_pytorch(trained: dict[str, Any], tmp_path: Path) -> None:
    code, job, stderr = _export(trained, tmp_path, "torchscript")
    assert code == 0, stderr
    result = json.loads(job.result_path.read_text())
    assert result["validation_passed"] is True and result["max_abs_diff"] <= 1e-4
    with zipfile.ZipFile(job.package_path) as archive:
        assert "model.pt" in archive.namelist()


def test_export_refuses_unsupported_options_as_user_error(trained: dict[str, Any], tmp_path: Path) -> None:
    code, _, stderr = _export(trained, tmp_path, "onnx", int8=True)
    assert code == 2
    assert "export_config.int8" in stderr


def test_predict_gives_top5_per_image_and_matches_validation_accuracy(trained: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    images = [PredictInput(path=path, name=path.name, true_label=label) for path, label in trained["heldout"]]
    job = PredictJob(inference_id="inf-1", training_job_id="job-1", checkpoint=trained["checkpoint"],
                     output_dir=tmp_path / "out", images=[*images, PredictInput(path=bad, name="bad.png")])
    code, lines, stderr = _run_module(MANIFEST.predict_module or "", job.model_dump_json(), tmp_path)
    assert code == 0, stderr
    assert any(line["type"] == "progress" for line in lines)
    document = json.loads(job.results_path.read_text())
    rows = document["results"]
    assert len(rows) == len(images) + 1
    first = rows[0]
    assert len(first["top5_predictions"]) == 5
    confidences = [p["confidence"] for p in first["top5_predictions"]]
    assert confidences == sorted(confidences, reverse=True)
    assert first["predicted_label"] == first["top5_predictions"][0]["label"]
    assert first["inference_time_ms"] > 0
    assert rows[-1]["error"] and rows[-1]["predicted_label"] is None
    summary = document["summary"]
    assert summary["total_images"] == len(images) + 1 and summary["failed_images"] == 1
    assert abs(summary["accuracy"] - trained["val_accuracy"]) <= 0.05


def test_predict_over_a_dataset_split(trained: dict[str, Any], tmp_path: Path) -> None:
    dataset = tmp_path / "ds"
    for path, label in trained["heldout"][:20]:
        (dataset / "val" / label).mkdir(parents=True, exist_ok=True)
        (dataset / "val" / label / path.name).write_bytes(path.read_bytes())
    job = PredictJob(inference_id="inf-2", training_job_id="job-1", checkpoint=trained["checkpoint"],
                     output_dir=tmp_path / "out", dataset_dir=dataset, split="val")
    code, _, stderr = _run_module(MANIFEST.predict_module or "", job.model_dump_json(), tmp_path)
    assert code == 0, stderr
    rows = json.loads(job.results_path.read_text())["results"]
    assert len(rows) == 20 and all(row["true_label"] for row in rows)
