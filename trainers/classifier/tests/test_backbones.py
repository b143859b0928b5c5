"""Standard backbones (timm) in the classifier's loop: advertised for the ultralytics environment, built
lazily, trained from scratch or from local weights with flips, exported to ONNX that validates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionyard.cli import trainer_envs
from visionyard.shared.commands import TrainingConfig
from visionyard.shared.sdk import ExportJob, TrainerJob


def test_backbones_are_advertised_for_the_ultralytics_environment_without_importing_timm() -> None:
    code = ("import sys; from visionyard.trainers.classifier.manifest import BACKBONES_MANIFEST as m; "
            "import visionyard.trainers.classifier.models; "
            "assert m.environment == 'ultralytics' and m.framework == 'timm'; "
            "assert m.model_names() == {'resnet18', 'resnet50', 'mobilenet_v3', 'efficientnet_b0', 'convnext_tiny'}; "
            "assert 'timm' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def trainer_python() -> Path:
    """The ultralytics environment's interpreter (it has timm and torchvision)."""
    found = trainer_envs.available().get("ultralytics")
    if found is None:
        pytest.fail("the ultralytics trainer environment is not built: run `make trainer-env`")
    return found


def _imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for index in range(8):
            pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (24, 24, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


def _run(python: Path, module: str, job_file: Path, weights: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "VISIONYARD_JOB_FILE": str(job_file),
           "VISIONYARD_RUNNER_WEIGHTS_DIR": str(weights)}
    return subprocess.run([str(python), "-m", module], env=env, capture_output=True, text=True, timeout=600)


def test_every_backbone_builds_and_runs_a_forward_pass(trainer_python: Path) -> None:
    code = ("import torch; from visionyard.trainers.classifier.models import BACKBONES, build_model\n"
            "for name in BACKBONES:\n"
            "    model = build_model(name, in_channels=3, num_classes=3).eval()\n"
            "    with torch.no_grad(): out = model(torch.zeros(1, 3, 32, 32))\n"
            "    assert tuple(out.shape) == (1, 3), (name, out.shape)\n"
            "print('ok')")
    run = subprocess.run([str(trainer_python), "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_resnet18_from_local_weights_with_flips_trains_and_exports(trainer_python: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    # A 1000-class state dict stands for downloaded ImageNet weights: the head must be skipped, the rest loaded.
    made = subprocess.run([str(trainer_python), "-c",
                           "import sys, timm, torch; torch.save(timm.create_model('resnet18', num_classes=1000)"
                           ".state_dict(), sys.argv[1])", str(weights / "resnet18.pth")],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    job = TrainerJob(job_id="b", config=TrainingConfig(
        framework="timm", model_name="resnet18", task_type="image_classification", dataset_id="d", epochs=2,
        batch_size=8, learning_rate=0.001,
        advanced_config={"image_size": 32, "pretrained": True, "hflip": True, "augment": True}),
        dataset_dir=_imagefolder(tmp_path / "data"), output_dir=tmp_path / "out", outbox_dir=tmp_path / "outbox")
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    trained = _run(trainer_python, "visionyard.trainers.classifier", job_file, weights)
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in trained.stderr.splitlines() if line.startswith('{"type"')]
    loaded = next(r for r in records if r["type"] == "log" and r["event_type"] == "pretrained")
    assert "resnet18.pth" in loaded["message"] and "fc.weight" in loaded["message"]
    assert [r["epoch"] for r in records if r["type"] == "progress"] == [1, 2]

    export = ExportJob(export_id="e", training_job_id="b", checkpoint=tmp_path / "out" / "best.pt",
                       output_dir=tmp_path / "export", export_format="onnx", model_name="resnet18")
    export_file = tmp_path / "export.json"
    export_file.write_text(export.model_dump_json())
    exported = _run(trainer_python, "visionyard.trainers.classifier.export", export_file, weights)
    assert exported.returncode == 0, exported.stderr[-3000:]
    result = json.loads(export.result_path.read_text())
    assert result["validation_passed"] is True and result["max_abs_diff"] <= 1e-4

    missing = job.model_copy(update={"output_dir": tmp_path / "out2"})
    job_file.write_text(missing.model_dump_json())
    refused = _run(trainer_python, "visionyard.trainers.classifier", job_file, tmp_path / "no-weights")
    assert refused.returncode == 2
    assert "advanced_config.pretrained is true but there are no local weights for resnet18" in refused.stderr
