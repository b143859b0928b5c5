"""A trainer directory written for the original platform's SDK trains on Visionyard with no change to its files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from visionyard.runner.adapters.process import SubprocessLauncher
from visionyard.runner.original import COMPAT_SDK_DIR
from visionyard.runner.ports import CheckpointDeclared, LaunchSpec
from visionyard.runner.service import AttemptOutcome, RunnerOptions, TrainingAttempts
from visionyard.runner.trainers import build_catalog
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.events import FailureReason, JobCompleted, JobFailed, JobStarted, LogEmitted, ProgressReported
from visionyard.shared.manifest import load_directory_manifest

from .fakes import ListSink, LocalStager, NoCancels

_spec = importlib.util.spec_from_file_location("original_trainer_source",
                                               Path(__file__).with_name("original_trainer_source.py"))
assert _spec is not None and _spec.loader is not None
source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(source)


class RecordingLauncher(SubprocessLauncher):
    def __init__(self) -> None:
        super().__init__()
        self.specs: list[LaunchSpec] = []

    async def launch(self, spec: LaunchSpec):  # type: ignore[no-untyped-def]
        self.specs.append(spec)
        return await super().launch(spec)


def yolo_version(root: Path) -> Path:
    """A staged YOLO version as storage keeps it: 4 images of 40×20 px with one box each, train/val folders."""
    for split, names in (("train", ["a", "b", "c"]), ("val", ["d"])):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (40, 20), (10, 20, 30)).save(root / "images" / split / f"{name}.png")
            (root / "labels" / split / f"{name}.txt").write_text("1 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("names:\n  0: circle\n  1: square\n")
    return root


def listing(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def command(job_id: str, *, behaviour: str = "train", split: dict[str, list[str]] | None = None) -> StartTraining:
    return StartTraining(
        job_id=job_id, attempt=1, project_id="p", experiment_name="e",
        config=TrainingConfig(framework="legacy-yolo", model_name="legacy-n", task_type="detection", dataset_id="ds7",
                              epochs=2, advanced_config={"behaviour": behaviour, "mosaic": 0.0}),
        dataset=DatasetRef(dataset_id="ds7", content_hash="c0ffee", split=split),
    )


def attempts_for(tmp_path: Path, trainer_dir: Path, dataset: Path) -> tuple[TrainingAttempts, ListSink, RecordingLauncher]:
    catalog = build_catalog([load_directory_manifest(trainer_dir)], trainer_envs={}, default_python=sys.executable)
    sink = ListSink()
    launcher = RecordingLauncher()
    attempts = TrainingAttempts(
        options=RunnerOptions(runner_id="r", work_dir=tmp_path / "work", trainer_python=sys.executable,
                              base_env={"PATH": os.environ.get("PATH", "")}, cancel_grace_seconds=1,
                              interpreters=catalog.interpreters, checkpoint_interval_seconds=0),
        manifests=catalog.manifests, stager=LocalStager(dataset), launcher=launcher, ledger=NoCancels(),
        new_sink=lambda: sink,
    )
    return attempts, sink, launcher


async def test_an_original_trainer_directory_trains_unchanged_through_the_pipe(tmp_path: Path) -> None:
    trainer_dir = source.write_trainer_dir(tmp_path / "legacy")
    # Its own interpreter (`venv/` inside it) is used: here one that records that it ran.
    venv_python = trainer_dir / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\necho venv >> "{tmp_path / "venv-used"}"\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    trainer_files = listing(trainer_dir)
    dataset = yolo_version(tmp_path / "staged")
    staged_before = listing(dataset)
    attempts, sink, launcher = attempts_for(tmp_path, trainer_dir, dataset)
    # The pinned split moves `c` to val: the trainer must see 2 train and 2 val images.
    split = {"train": ["images/train/a.png", "images/train/b.png"], "val": ["images/train/c.png", "images/val/d.png"]}

    assert await attempts.run(command("41", split=split), delivered=1, final_delivery=False) is AttemptOutcome.FINISHED

    failures = [i for i in sink.items if isinstance(i, JobFailed)]
    assert not failures, [i for i in sink.items if isinstance(i, LogEmitted)]
    assert isinstance(sink.items[0], JobStarted) and isinstance(sink.items[-1], JobCompleted)
    spec = launcher.specs[0]
    assert spec.argv == [str(venv_python), str(trainer_dir / "train.py"), "--log-level", "INFO"]
    assert spec.cwd == trainer_dir and (tmp_path / "venv-used").read_text().split() == ["venv"]
    assert spec.env["PYTHONPATH"].split(os.pathsep)[0] == str(COMPAT_SDK_DIR)
    assert spec.env["JOB_ID"] == "41" and spec.env["MODEL_NAME"] == "legacy-n" and spec.env["DATASET_ID"] == "ds7"
    assert not [key for key in spec.env if "ACCESS_KEY" in key or "SECRET" in key or "NATS" in key]

    prepared = next(i for i in sink.items if isinstance(i, LogEmitted) and i.message == "prepared")
    assert prepared.data is not None
    assert (prepared.data["train"], prepared.data["val"]) == (2, 2)
    assert len(prepared.data["labels"]) == 4 and "square" in prepared.data["data_yaml"]
    assert prepared.data["mosaic"] == 0.0  # advanced options reach the top level of CONFIG too

    progress = [i for i in sink.items if isinstance(i, ProgressReported)]
    assert [(p.epoch, p.total_epochs) for p in progress] == [(1, 2), (2, 2), (3, 2)]  # one past the total
    assert progress[0].metrics == {"loss": 1.0, "metrics/mAP50_B": 0.6}  # MLflow-valid names, non-numbers dropped
    declared = [i for i in sink.items if isinstance(i, CheckpointDeclared)]
    assert sorted(d.kind for d in declared) == ["best", "last"]
    completed = sink.items[-1]
    assert isinstance(completed, JobCompleted)
    assert completed.total_epochs_completed == 2 and completed.final_metrics == {"loss": 0.2, "metrics/mAP50-95_B": 0.4}
    assert sorted(completed.declared_checkpoints) == ["best", "last"]
    assert listing(dataset) == staged_before  # the shared staged version is never written
    assert listing(trainer_dir) == trainer_files | {"venv/bin/python": venv_python.read_bytes()}


@pytest.mark.parametrize(
    ("behaviour", "reason", "message", "exit_code"),
    [
        ("dataset-error", FailureReason.USER_ERROR, "[DatasetError] annotations_detection.json is missing", 1),
        ("die", FailureReason.TRAINER_CRASH, "the trainer exited with code 3", 3),
    ],
)
async def test_a_failing_original_trainer_fails_its_job_classified(
    tmp_path: Path, behaviour: str, reason: FailureReason, message: str, exit_code: int
) -> None:
    trainer_dir = source.write_trainer_dir(tmp_path / "legacy")
    attempts, sink, _ = attempts_for(tmp_path, trainer_dir, yolo_version(tmp_path / "staged"))
    assert await attempts.run(command("42", behaviour=behaviour), delivered=1, final_delivery=False) \
        is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed), sink.items
    assert failed.reason is reason and failed.error_message.startswith(message) and failed.exit_code == exit_code


# -- the SDK module itself, in this process -----------------------------------------------------------------


@pytest.fixture
def sdk_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("trainer_sdk_under_test", COMPAT_SDK_DIR / "trainer_sdk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("JOB_ID", "9")
    monkeypatch.setenv("TASK_TYPE", "detection")
    monkeypatch.delenv("VISIONYARD_EVENTS_FD", raising=False)
    return module


def coco_version(root: Path) -> Path:
    """A staged COCO version: images/ and annotations/instances_{train,val}.json, 100×50 px images."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for split, names in (("train", ["p", "q"]), ("val", ["r"])):
        images, annotations = [], []
        for index, name in enumerate(names, start=1):
            Image.new("RGB", (100, 50)).save(root / "images" / f"{name}.jpg")
            images.append({"id": index, "file_name": f"{name}.jpg", "width": 100, "height": 50})
            annotations.append({"id": index, "image_id": index, "category_id": 7, "bbox": [10, 5, 20, 10]})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": 0, "name": "__background__"}, {"id": 7, "name": "bolt"}]}))
    return root


def test_a_coco_version_downloads_as_dice_and_converts_to_yolo_with_the_layouts_split(
    sdk_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = coco_version(tmp_path / "staged" / "wrapped")  # a zip that wrapped everything in one folder
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"dataset_dir": str(tmp_path / "staged"), "outbox_dir": str(tmp_path / "outbox")}))
    monkeypatch.setenv("VISIONYARD_JOB_FILE", str(job_file))
    sdk = sdk_module.TrainerSDK()
    dest = Path(sdk.download_dataset_with_cache("snap", "ds", "hash", str(tmp_path / "job")))
    assert dest == tmp_path / "job" / "dataset"
    dice = json.loads((dest / "annotations_detection.json").read_text())
    assert {image["file_name"] for image in dice["images"]} == {"images/p.jpg", "images/q.jpg", "images/r.jpg"}
    assert sdk.convert_dataset(str(dest), "dice", "yolo") == str(dest)
    assert (dest / "labels" / "p.txt").read_text() == "0 0.200000 0.200000 0.200000 0.200000"
    assert len((dest / "train.txt").read_text().splitlines()) == 2
    assert (dest / "val.txt").read_text().strip().endswith("images/r.jpg")
    assert "bolt" in (dest / "data.yaml").read_text() and "__background__" not in (dest / "data.yaml").read_text()
    assert not list(staged.rglob("*.txt"))  # nothing written into the staged version
    with pytest.raises(NotImplementedError):
        sdk.convert_dataset(str(dest), "coco", "voc")


def test_image_sizes_are_read_from_headers_without_pillow(sdk_module: ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for suffix, size in ((".png", (31, 17)), (".jpg", (64, 48)), (".gif", (5, 9)), (".bmp", (12, 34))):
        Image.new("RGB", size).save(tmp_path / f"i{suffix}")
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    for suffix, size in ((".png", (31, 17)), (".jpg", (64, 48)), (".gif", (5, 9)), (".bmp", (12, 34))):
        assert sdk_module._image_size(tmp_path / f"i{suffix}") == size


@pytest.mark.integration
async def test_a_registered_trainer_directory_is_advertised_in_the_model_catalogue(
    bus, nats_server, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    import asyncio

    from visionyard.api.adapters.capabilities import KvCapabilitySource
    from visionyard.api.models.service import list_models
    from visionyard.runner.config import RunnerSettings
    from visionyard.runner.main import serve

    trainer_dir = source.write_trainer_dir(tmp_path / "legacy")
    broken = tmp_path / "broken"
    broken.mkdir()
    settings = RunnerSettings(nats_url=nats_server.url, data_dir=tmp_path / "data", heartbeat_seconds=1.0,
                              trainer_dirs=[trainer_dir, broken])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop))
    try:
        source_of_truth = KvCapabilitySource(bus)
        for _ in range(400):
            models = list_models(await source_of_truth.manifests(), framework=None, task_type=None)
            if any(m["model_name"] == "legacy-n" for m in models):
                break
            await asyncio.sleep(0.05)
        legacy = next(m for m in models if m["model_name"] == "legacy-n")
        assert (legacy["framework"], legacy["display_name"], legacy["parameters"]["min"]) == ("legacy-yolo", "Legacy Nano", 1.8)
        assert {m["framework"] for m in models} >= {"pytorch", "legacy-yolo"}  # packages and directories together
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
