"""Trainer environments: which interpreter runs each trainer, and which trainers a runner advertises."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from visionyard.runner.adapters.process import SubprocessLauncher
from visionyard.runner.config import RunnerSettings
from visionyard.runner.service import AttemptOutcome, RunnerOptions, TrainingAttempts
from visionyard.runner.trainers import TrainerUnavailable, build_catalog, discover_manifests, resolve_interpreter
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.events import JobCompleted, JobFailed, LogEmitted
from visionyard.shared.manifest import TrainerManifest

from .fakes import ListSink, LocalStager, NoCancels


def manifest(name: str = "t", **fields: object) -> TrainerManifest:
    base: dict[str, object] = dict(
        name=name, framework=f"fw-{name}", version="1", module="tiny.trainer", task_types=["image_classification"],
        models=[{"model_name": "m", "display_name": "M", "task_types": ["image_classification"]}],
        dataset_formats=["imagefolder"],
    )
    base.update(fields)
    return TrainerManifest.model_validate(base)


def fake_env(root: Path, name: str) -> Path:
    """A trainer environment whose `bin/python` marks that it ran, then runs the real interpreter."""
    python = root / name / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "{name}" >> "{root / "used"}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return root / name


def test_trainer_envs_and_dirs_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONYARD_RUNNER_TRAINER_ENVS", "ultralytics=/opt/yolo-env, timm = /opt/timm/bin/python")
    monkeypatch.setenv("VISIONYARD_RUNNER_TRAINER_DIRS", f"{tmp_path / 'a'}:{tmp_path / 'b'},{tmp_path / 'c'}")
    settings = RunnerSettings(data_dir=tmp_path)
    assert settings.trainer_envs == {"ultralytics": "/opt/yolo-env", "timm": "/opt/timm/bin/python"}
    assert settings.trainer_dirs == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    monkeypatch.setenv("VISIONYARD_RUNNER_TRAINER_ENVS", json.dumps({"x": "/y"}))
    assert RunnerSettings(data_dir=tmp_path).trainer_envs == {"x": "/y"}
    monkeypatch.setenv("VISIONYARD_RUNNER_TRAINER_ENVS", "ultralytics")
    with pytest.raises(ValueError, match="not name=path"):
        RunnerSettings(data_dir=tmp_path)


def test_interpreter_is_the_directory_venv_then_the_named_environment_then_the_default(tmp_path: Path) -> None:
    env = fake_env(tmp_path, "ultra")
    envs = {"ultralytics": str(env), "direct": str(env / "bin" / "python"), "broken": str(tmp_path / "nowhere")}
    assert resolve_interpreter(manifest(), trainer_envs=envs, default_python="/py") == "/py"
    assert resolve_interpreter(manifest(environment="ultralytics"), trainer_envs=envs, default_python="/py") == str(
        env / "bin" / "python")
    assert resolve_interpreter(manifest(environment="direct"), trainer_envs=envs, default_python="/py") == str(
        env / "bin" / "python")
    with pytest.raises(TrainerUnavailable, match="'timm' is not configured"):
        resolve_interpreter(manifest(environment="timm"), trainer_envs=envs, default_python="/py")
    with pytest.raises(TrainerUnavailable, match="no executable interpreter"):
        resolve_interpreter(manifest(environment="broken"), trainer_envs=envs, default_python="/py")
    directory = tmp_path / "trainer"
    (directory / "venv" / "bin").mkdir(parents=True)
    (directory / "venv" / "bin" / "python").write_text("")
    own = manifest(module=None, entrypoint="train.py", directory=str(directory), environment="timm")
    assert resolve_interpreter(own, trainer_envs=envs, default_python="/py") == str(directory / "venv" / "bin" / "python")


def test_a_trainer_whose_environment_is_missing_is_not_advertised_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = fake_env(tmp_path, "ultra")
    caplog.set_level(logging.WARNING, logger="visionyard.runner.trainers")
    catalog = build_catalog(
        [manifest("plain"), manifest("yolo", environment="ultralytics"), manifest("timm", environment="timm")],
        trainer_envs={"ultralytics": str(env)}, default_python="/py",
    )
    assert [m.name for m in catalog.manifests] == ["plain", "yolo"]
    assert catalog.interpreters == {"plain": "/py", "yolo": str(env / "bin" / "python")}
    assert "trainer timm not advertised: environment 'timm' is not configured" in caplog.text


def test_a_broken_trainer_directory_is_skipped_with_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="visionyard.runner.trainers")
    (tmp_path / "no-caps").mkdir()
    (tmp_path / "no-caps" / "train.py").write_text("")
    found = discover_manifests([tmp_path / "no-caps", tmp_path / "missing"])
    assert not any(m.directory for m in found)
    assert "no capabilities.json" in caplog.text and "no train.py" in caplog.text


TINY_TRAINER = '''
import sys
from visionyard.shared.sdk import Reporter, load_job
job = load_job()
reporter = Reporter.from_env()
reporter.log("interpreter " + sys.executable)
reporter.progress(1, 1, {"loss": 0.5})
reporter.result(final_metrics={"loss": 0.5}, epochs_completed=1)
reporter.close()
'''


async def test_training_spawns_the_trainer_with_its_environments_interpreter(tmp_path: Path) -> None:
    env = fake_env(tmp_path, "ultra")
    package = tmp_path / "pkg" / "tiny"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "trainer.py").write_text(TINY_TRAINER)
    catalog = build_catalog([manifest("yolo", environment="ultralytics")], trainer_envs={"ultralytics": str(env)},
                            default_python="/nonexistent/python")
    sink = ListSink()
    source_paths = ":".join([str(tmp_path / "pkg"), *sys.path])
    attempts = TrainingAttempts(
        options=RunnerOptions(runner_id="r", work_dir=tmp_path / "work", trainer_python="/nonexistent/python",
                              base_env={"PYTHONPATH": source_paths}, cancel_grace_seconds=1,
                              interpreters=catalog.interpreters),
        manifests=catalog.manifests, stager=LocalStager(tmp_path), launcher=SubprocessLauncher(), ledger=NoCancels(),
        new_sink=lambda: sink,
    )
    cmd = StartTraining(
        job_id="7", attempt=1, project_id="p", experiment_name="e",
        config=TrainingConfig(framework="fw-yolo", model_name="m", task_type="image_classification", dataset_id="d"),
        dataset=DatasetRef(dataset_id="d", content_hash="h"),
    )
    assert await attempts.run(cmd, delivered=1, final_delivery=False) is AttemptOutcome.FINISHED
    assert not [i for i in sink.items if isinstance(i, JobFailed)], sink.items
    assert isinstance(sink.items[-1], JobCompleted)
    assert (tmp_path / "used").read_text().split() == ["ultra"]  # the environment's interpreter started it
    assert any(isinstance(i, LogEmitted) and i.message.startswith("interpreter ") for i in sink.items)


def test_the_services_never_import_torch_even_when_reading_every_installed_manifest() -> None:
    import subprocess

    code = ("import sys, visionyard.runner.main, visionyard.api.main, visionyard.tracker.main, visionyard.storage.main\n"
            "from visionyard.runner.trainers import discover_manifests\n"
            "assert discover_manifests([]), 'no trainer installed'\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'ultralytics', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
