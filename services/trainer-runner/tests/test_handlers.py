"""The runner in-process against a real nats-server, a fake storage responder and real trainer subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from visionyard.runner.config import RunnerSettings
from visionyard.runner.main import serve
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.events import (
    CheckpointStaged,
    FailureReason,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobStarted,
    ProgressReported,
    decode_job_event,
)
from visionyard.shared.manifest import ModelInfo, TrainerManifest
from visionyard.shared.requests import StageReply, StageRequest
from visionyard.trainers.classifier.manifest import MANIFEST as CLASSIFIER

from .fakes import answering, until_acked

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("fake_trainer_source", Path(__file__).with_name("fake_trainer_source.py"))
assert _spec and _spec.loader
_fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake)

FAKE = TrainerManifest(
    name="fake", framework="fake", version="0", module="vy_fake_trainer", task_types=["image_classification"],
    models=[ModelInfo(model_name="fake", display_name="fake", task_types=["image_classification"])],
    dataset_formats=["imagefolder"],
)
TERMINAL = {"completed", "failed", "cancelled"}
RUNNING: dict[str, tuple[asyncio.Event, asyncio.Task[None], list[StageRequest]]] = {}


def digits_zip(root: Path) -> tuple[Path, str]:
    """A zip of a 3-class digits ImageFolder and its sha256 (used as the content hash)."""
    digits = load_digits()
    folder = root / "digits"
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label < 3:
            (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"class_{label}" / f"{index}.png")
    archive = root / "digits.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*.png")):
            bundle.write(path, path.relative_to(folder).as_posix())
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture
async def runner(bus: Bus, nats_server, tmp_path: Path) -> AsyncIterator[tuple[str, RunnerSettings]]:  # type: ignore[no-untyped-def]
    """Fake storage answering `storage.stage`, plus the runner service running in-process."""
    archive, content_hash = digits_zip(tmp_path / "dataset")
    stage_requests: list[StageRequest] = []

    async def stage(request: StageRequest) -> StageReply:
        stage_requests.append(request)
        if request.content_hash != content_hash:
            return StageReply(ok=False, error="no such checkpoint or dataset")
        name = f"dataset/{content_hash}.zip"
        sha, size = await bus.put_file(name, archive)
        return StageReply(ok=True, object_name=name, sha256=sha, size_bytes=size)

    trainer_path = tmp_path / "trainer_path"
    trainer_path.mkdir()
    (trainer_path / "vy_fake_trainer.py").write_text(_fake.SOURCE)
    settings = RunnerSettings(
        nats_url=nats_server.url, data_dir=tmp_path / "data", slots=2, heartbeat_seconds=1.0,
        cancel_grace_seconds=1.0, trainer_python=sys.executable,
        trainer_base_env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(trainer_path)},
    )
    async with answering(bus, "storage", {subjects.STORAGE_STAGE: stage}):
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings, stop=stop, manifests=[CLASSIFIER, FAKE]))
        RUNNING[content_hash] = (stop, task, stage_requests)
        yield content_hash, settings
        stop.set()
        await asyncio.wait_for(task, timeout=30)


def start_command(job_id: str, content_hash: str, *, framework: str = "fake", model: str = "fake", epochs: int = 2,
                  advanced: dict[str, object] | None = None) -> StartTraining:
    return StartTraining(
        job_id=job_id, attempt=1, project_id="proj", experiment_name="exp",
        config=TrainingConfig(framework=framework, model_name=model, task_type="image_classification", dataset_id="ds",
                              epochs=epochs, batch_size=16, learning_rate=0.01, advanced_config=advanced),
        dataset=DatasetRef(dataset_id="ds", content_hash=content_hash),
    )


async def job_events(bus: Bus, job_id: str, *, until: set[str], timeout: float = 90) -> AsyncIterator[JobEvent]:
    """Every event of `job_id` from the EVENTS stream, in stream order, until one of `until` kinds."""
    sub = await bus.js.subscribe(subjects.job_events(job_id), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            event = decode_job_event(msg.subject, msg.data)
            yield event
            if event.kind in until:
                return
    finally:
        await sub.unsubscribe()


async def collect(bus: Bus, job_id: str, *, until: set[str] = TERMINAL) -> list[JobEvent]:
    return [event async for event in job_events(bus, job_id, until=until)]


async def test_trains_the_classifier_and_publishes_ordered_events_with_staged_checkpoints(
    bus: Bus, runner: tuple[str, RunnerSettings], tmp_path: Path
) -> None:
    content_hash, settings = runner
    await bus.publish(start_command("job-cls", content_hash, framework="pytorch", model="simple_cnn", epochs=2,
                                    advanced={"image_size": 8}))
    events = await collect(bus, "job-cls")
    assert isinstance(events[0], JobStarted) and events[0].dataset_hash == content_hash
    assert [e.epoch for e in events if isinstance(e, ProgressReported)] == [1, 2]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    checkpoints = [e for e in events if isinstance(e, CheckpointStaged)]
    assert {c.checkpoint_kind for c in checkpoints} >= {"last", "best"}
    for checkpoint in checkpoints:
        copy = await bus.get_file(checkpoint.object_name, tmp_path / "got" / checkpoint.object_name, sha256=checkpoint.sha256)
        assert copy.stat().st_size == checkpoint.size_bytes
    completed = events[-1]
    assert isinstance(completed, JobCompleted) and completed.total_epochs_completed == 2
    assert sorted(completed.declared_checkpoints) == ["best", "last"]
    assert (settings.runner_work_dir / "cache" / "datasets" / content_hash / "class_0").is_dir()
    capabilities = await bus.kv(streams.KV_CAPABILITIES)
    assert json.loads((await capabilities.get("pytorch-classifier")).value)["framework"] == "pytorch"
    await until_acked(bus)


async def test_cancel_kills_the_whole_process_group_and_publishes_cancelled(
    bus: Bus, runner: tuple[str, RunnerSettings]
) -> None:
    content_hash, settings = runner
    await bus.publish(start_command("job-cancel", content_hash, advanced={"behaviour": "grandchild"}))
    seen = job_events(bus, "job-cancel", until=TERMINAL)
    started = await anext(seen)
    assert isinstance(started, JobStarted) and started.pid
    progress = await anext(seen)
    while not isinstance(progress, ProgressReported):
        progress = await anext(seen)
    grandchild_file = settings.runner_work_dir / "jobs" / "job-cancel" / "1" / "grandchild.pid"
    grandchild = int(grandchild_file.read_text())
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    await kv.put("job-cancel", json.dumps({"attempt": 1}).encode())
    rest = [event async for event in seen]
    assert isinstance(rest[-1], JobCancelled)
    for pid in (started.pid, grandchild):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    await until_acked(bus)


@pytest.mark.parametrize(("behaviour", "reason", "text"), [
    ("crash", FailureReason.TRAINER_CRASH, "something exploded"),
    ("user_error", FailureReason.USER_ERROR, "no classes"),
])
async def test_trainer_failures_are_classified(
    bus: Bus, runner: tuple[str, RunnerSettings], behaviour: str, reason: FailureReason, text: str
) -> None:
    content_hash, _ = runner
    await bus.publish(start_command(f"job-{behaviour}", content_hash, advanced={"behaviour": behaviour}))
    events = await collect(bus, f"job-{behaviour}")
    failed = events[-1]
    assert isinstance(failed, JobFailed) and failed.reason is reason and text in (failed.error_message + (failed.traceback or ""))
    assert any(e.kind == "log" and getattr(e, "event_type", "") == "stdout" for e in events)


async def test_fake_trainer_checkpoints_are_staged_then_completed(bus: Bus, runner: tuple[str, RunnerSettings]) -> None:
    content_hash, _ = runner
    await bus.publish(start_command("job-ok", content_hash))
    events = await collect(bus, "job-ok")
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed"
    staged = [e for e in events if isinstance(e, CheckpointStaged)]
    assert [c.epoch for c in staged] == [1, 2]
    assert all(c.object_name == f"ckpt/job-ok/1/{c.seq}-last.pt" for c in staged)
    assert all(await asyncio.gather(*(bus.has_object(c.object_name) for c in staged)))


async def test_a_job_cancelled_before_it_is_claimed_never_starts(bus: Bus, runner: tuple[str, RunnerSettings]) -> None:
    content_hash, _ = runner
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    await kv.put("job-early", json.dumps({"attempt": 1}).encode())
    await bus.publish(start_command("job-early", content_hash))
    events = await collect(bus, "job-early")
    assert [e.kind for e in events] == ["cancelled"]
    await until_acked(bus)


async def test_a_trainer_ignoring_sigterm_is_killed_after_the_grace_period(
    bus: Bus, runner: tuple[str, RunnerSettings]
) -> None:
    content_hash, _ = runner
    await bus.publish(start_command("job-stubborn", content_hash, advanced={"behaviour": "forever"}))
    seen = job_events(bus, "job-stubborn", until=TERMINAL)
    first = await anext(seen)
    assert isinstance(first, JobStarted)
    info = await bus.js.consumer_info(streams.RUNNER.stream, streams.RUNNER.durable)
    assert info.num_ack_pending == 1  # held unacked while the trainer runs
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    await kv.put("job-stubborn", json.dumps({"attempt": 1}).encode())
    rest = [event async for event in seen]
    assert isinstance(rest[-1], JobCancelled)
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid or 0, 0)


async def test_shutdown_naks_the_command_so_the_next_delivery_resumes_as_a_new_attempt(
    bus: Bus, nats_server, runner: tuple[str, RunnerSettings], tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    content_hash, settings = runner
    stop, task, stage_requests = RUNNING[content_hash]
    await bus.publish(start_command("job-move", content_hash, advanced={"behaviour": "forever"}))
    # Stop only once the trainer has reported: on a loaded machine it may still be importing at `started`.
    seen = [event async for event in job_events(bus, "job-move", until={"progress"})]
    first = next(event for event in seen if isinstance(event, JobStarted))
    assert first.attempt == 1
    stop.set()
    await asyncio.wait_for(task, timeout=30)
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid or 0, 0)
    events = [e async for e in job_events(bus, "job-move", until={"progress"}, timeout=5)]
    assert not any(e.kind in TERMINAL for e in events)
    # A second runner picks the handed-back command up at once as attempt 2 and asks for the checkpoint.
    second = asyncio.Event()
    other = settings.model_copy(update={"work_dir": tmp_path / "other", "runner_id": "second"})
    task2 = asyncio.create_task(serve(other, stop=second, manifests=[FAKE]))
    try:
        restarted = None
        async for event in job_events(bus, "job-move", until=set(), timeout=30):
            if isinstance(event, JobStarted) and event.attempt == 2:
                restarted = event
                break
        assert restarted is not None and restarted.runner_id == "second"
        assert any(r.job_id == "job-move" and r.checkpoint_kind == "last" for r in stage_requests)
    finally:
        second.set()
        await asyncio.wait_for(task2, timeout=30)
