"""Export and inference through the runner in-process: a real nats-server, a fake storage responder,
the real classifier (trained here first) and a slow fake exporter/predictor for cancel, shutdown and the
runner losing the broker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from visionyard.runner.config import RunnerSettings
from visionyard.runner.main import serve
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import (
    CheckpointRef,
    DatasetRef,
    StartExport,
    StartInference,
    StartTraining,
    TrainingConfig,
)
from visionyard.shared.events import (
    CheckpointStaged,
    ExportCancelled,
    ExportCompleted,
    ExportInferenceEvent,
    ExportPackageStaged,
    ExportProgress,
    ExportStarted,
    InferenceCancelled,
    InferenceCompleted,
    InferenceResultsStaged,
    InferenceStarted,
    JobCompleted,
    decode_export_inference_event,
    decode_job_event,
)
from visionyard.shared.manifest import ModelInfo, TrainerManifest
from visionyard.shared.natsserver import NatsServer, free_port
from visionyard.shared.requests import StageObjectRequest, StageReply, StageRequest
from visionyard.trainers.classifier.manifest import MANIFEST as CLASSIFIER

from .fakes import answering, until_acked

pytestmark = pytest.mark.integration

TERMINAL = {"completed", "failed", "cancelled"}

# An exporter/predictor that ignores SIGTERM (so the runner must escalate to SIGKILL) and leaves a grandchild
# in its group.
SLOW_RUN = '''
import pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
pathlib.Path("grandchild.pid").write_text(str(child.pid))
time.sleep(600)
'''

SLOW = TrainerManifest(
    name="slow", framework="fake", version="0", module="vy_slow_run", task_types=["image_classification"],
    models=[ModelInfo(model_name="fake", display_name="fake", task_types=["image_classification"])],
    dataset_formats=["imagefolder"], export_module="vy_slow_run", predict_module="vy_slow_run",
    export_formats=["onnx"], environment="slowenv",
)


@dataclass
class FakeStorage:
    """What storage would hold: a dataset zip, checkpoints (by training job and kind), uploaded images."""

    bus: Bus
    root: Path
    content_hash: str = ""
    archive: Path | None = None
    checkpoints: dict[tuple[str, str], CheckpointStaged] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)

    async def stage(self, request: StageRequest) -> StageReply:
        if request.content_hash == self.content_hash and self.archive is not None:
            name = f"dataset/{self.content_hash}.zip"
            sha, size = await self.bus.put_file(name, self.archive)
            return StageReply(ok=True, object_name=name, sha256=sha, size_bytes=size)
        stored = self.checkpoints.get((request.job_id or "", request.checkpoint_kind or ""))
        if stored is not None:  # the runner staged it while training: it is still in the object store
            return StageReply(ok=True, object_name=stored.object_name, sha256=stored.sha256,
                              size_bytes=stored.size_bytes, epoch=stored.epoch)
        if (request.job_id or "").startswith("fake-"):
            dummy = self.root / "dummy.pt"
            dummy.write_bytes(b"not a real checkpoint")
            sha, size = await self.bus.put_file("ckpt/fake/best.pt", dummy)
            return StageReply(ok=True, object_name="ckpt/fake/best.pt", sha256=sha, size_bytes=size)
        return StageReply(ok=False, error="no such checkpoint or dataset")

    async def stage_object(self, request: StageObjectRequest) -> StageReply:
        path = self.images.get(request.uri)
        if path is None:
            return StageReply(ok=False, error=f"no object {request.uri}")
        name = f"objects/{hashlib.sha256(request.uri.encode()).hexdigest()}"
        sha, size = await self.bus.put_file(name, path)
        return StageReply(ok=True, object_name=name, sha256=sha, size_bytes=size)


@dataclass
class Runner:
    storage: FakeStorage
    settings: RunnerSettings
    stop: asyncio.Event
    task: asyncio.Task[None]


def _digits(root: Path, storage: FakeStorage) -> None:
    """A 3-class digits ImageFolder zip as the dataset, and 4 held-out digits as uploaded images."""
    digits = load_digits()
    folder = root / "digits"
    held_out = 0
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label >= 3:
            continue
        picture = Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L")
        if index >= 1700 and held_out < 4:
            path = root / "uploads" / f"{held_out}-label{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
            storage.images[f"file:///store/uploads/session/{path.name}"] = path
            held_out += 1
            continue
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"class_{label}" / f"{index}.png")
    archive = root / "digits.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*.png")):
            bundle.write(path, path.relative_to(folder).as_posix())
    storage.archive = archive
    storage.content_hash = hashlib.sha256(archive.read_bytes()).hexdigest()


@contextlib.asynccontextmanager
async def running(bus: Bus, tmp_path: Path, nats_url: str, **settings: Any) -> AsyncIterator[Runner]:
    """Fake storage answering `storage.stage` and `storage.stage_object`, and the runner in-process on `nats_url`."""
    storage = FakeStorage(bus=bus, root=tmp_path)
    _digits(tmp_path / "data-src", storage)
    trainer_path = tmp_path / "trainer_path"
    trainer_path.mkdir()
    (trainer_path / "vy_slow_run.py").write_text(SLOW_RUN)
    # The slow run's environment: an interpreter that records each start, then runs this one.
    slowenv = tmp_path / "slowenv" / "bin" / "python"
    slowenv.parent.mkdir(parents=True)
    slowenv.write_text(f'#!/bin/sh\necho started >> "{tmp_path / "slowenv" / "starts"}"\nexec "{sys.executable}" "$@"\n')
    slowenv.chmod(0o755)
    options: dict[str, Any] = dict(
        nats_url=nats_url, data_dir=tmp_path / "data", slots=2, heartbeat_seconds=1.0,
        cancel_grace_seconds=1.0, trainer_python=sys.executable,
        trainer_base_env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(trainer_path)},
        trainer_envs={"slowenv": str(tmp_path / "slowenv")},
    )
    settings = RunnerSettings(**{**options, **settings})
    async with answering(bus, "storage", {subjects.STORAGE_STAGE: storage.stage,
                                          subjects.STORAGE_STAGE_OBJECT: storage.stage_object}):
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings, stop=stop, manifests=[CLASSIFIER, SLOW]))
        try:
            yield Runner(storage=storage, settings=settings, stop=stop, task=task)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)


@pytest.fixture
async def runner(bus: Bus, nats_server, tmp_path: Path) -> AsyncIterator[Runner]:  # type: ignore[no-untyped-def]
    """The runner on the test's nats-server, with fake storage."""
    async with running(bus, tmp_path, nats_server.url) as started:
        yield started


async def run_events(bus: Bus, family: str, job_id: str, *, until: set[str], timeout: float = 120) -> AsyncIterator[ExportInferenceEvent]:
    """Every event of one export/inference job, in stream order, until one of the `until` kinds."""
    sub = await bus.js.subscribe(subjects.export_inference_events(family, job_id), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            event = decode_export_inference_event(msg.subject, msg.data)
            yield event
            if event.kind in until:
                return
    finally:
        await sub.unsubscribe()


async def collect(bus: Bus, family: str, job_id: str) -> list[ExportInferenceEvent]:
    return [event async for event in run_events(bus, family, job_id, until=TERMINAL)]


async def train_classifier(bus: Bus, runner: Runner, job_id: str) -> None:
    """Train the real classifier for 2 epochs; keep its staged checkpoints where fake storage finds them."""
    storage = runner.storage
    await bus.publish(StartTraining(
        job_id=job_id, attempt=1, project_id="proj", experiment_name="exp",
        config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                              dataset_id="ds", epochs=2, batch_size=16, learning_rate=0.01,
                              advanced_config={"image_size": 8}),
        dataset=DatasetRef(dataset_id="ds", content_hash=storage.content_hash),
    ))
    sub = await bus.js.subscribe(subjects.job_events(job_id), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=120)
            event = decode_job_event(msg.subject, msg.data)
            if isinstance(event, CheckpointStaged):
                storage.checkpoints[(job_id, event.checkpoint_kind)] = event
            if event.kind in TERMINAL:
                assert isinstance(event, JobCompleted), event
                return
    finally:
        await sub.unsubscribe()


def _ref(kind: str = "best") -> CheckpointRef:
    return CheckpointRef(kind=kind, uri=f"file:///store/{kind}.pt", sha256="0" * 64)


async def test_exports_then_classifies_with_a_checkpoint_the_classifier_trained(
    bus: Bus, runner: Runner, tmp_path: Path
) -> None:
    await train_classifier(bus, runner, "train-1")

    await bus.publish(StartExport(
        job_id="exp-1", attempt=1, training_job_id="train-1", export_format="onnx", checkpoint=_ref(),
        framework="pytorch", model_name="simple_cnn", task_type="image_classification",
    ))
    events = await collect(bus, "export", "exp-1")
    assert isinstance(events[0], ExportStarted) and events[0].runner_id == runner.settings.runner_id
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.training_job_id == "train-1" for e in events)
    assert any(isinstance(e, ExportProgress) and "validating" in e.message for e in events)
    staged, completed = events[-2], events[-1]
    assert isinstance(staged, ExportPackageStaged) and isinstance(completed, ExportCompleted)
    assert completed.results["validation_passed"] is True
    assert completed.results["class_names"] == ["class_0", "class_1", "class_2"]
    package = await bus.get_file(staged.object_name, tmp_path / "got" / "package.zip", sha256=staged.sha256)
    assert package.stat().st_size == staged.size_bytes
    assert hashlib.sha256(package.read_bytes()).hexdigest() == staged.sha256
    with zipfile.ZipFile(package) as bundle:
        assert set(bundle.namelist()) == {"model.onnx", "metadata.json", "example.py"}
        metadata = json.loads(bundle.read("metadata.json"))
        model_bytes = bundle.read("model.onnx")
    assert (metadata["format"], metadata["input"]["shape"]) == ("onnx", ["batch", 1, 8, 8])
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((2, 1, 8, 8), dtype=np.float32)})[0]
    assert logits.shape == (2, 3)

    uris = sorted(runner.storage.images)
    await bus.publish(StartInference(
        job_id="inf-1", attempt=1, training_job_id="train-1", checkpoint=_ref(), framework="pytorch",
        model_name="simple_cnn", task_type="image_classification", inference_type="batch", image_uris=uris, top_k=2,
    ))
    events = await collect(bus, "infer", "inf-1")
    assert isinstance(events[0], InferenceStarted)
    staged_results, done = events[-2], events[-1]
    assert isinstance(staged_results, InferenceResultsStaged) and isinstance(done, InferenceCompleted)
    assert (done.results_object, done.results_sha256) == (staged_results.object_name, staged_results.sha256)
    assert done.results["total_images"] == len(uris)
    results = await bus.get_file(staged_results.object_name, tmp_path / "got" / "results.json",
                                 sha256=staged_results.sha256)
    rows = json.loads(results.read_text())["results"]
    assert [row["image_name"] for row in rows] == [uri.rsplit("/", 1)[1] for uri in uris]
    assert all(row["predicted_label"] in {"class_0", "class_1", "class_2"} and len(row["top5_predictions"]) == 2
               for row in rows)
    # The trained CNN gets most of these held-out digits right (names carry the true label).
    right = sum(row["predicted_label"] == "class_" + row["image_name"].split("label")[1][0] for row in rows)
    assert right >= 2
    await until_acked(bus)
    assert not (runner.settings.runner_work_dir / "exports" / "exp-1").joinpath("1").exists()


async def test_an_export_of_a_missing_checkpoint_fails_as_a_user_error(bus: Bus, runner: Runner) -> None:
    await bus.publish(StartExport(
        job_id="exp-missing", attempt=1, training_job_id="never-trained", export_format="onnx", checkpoint=_ref(),
        framework="pytorch", model_name="simple_cnn", task_type="image_classification",
    ))
    events = await collect(bus, "export", "exp-missing")
    assert [e.kind for e in events] == ["failed"]
    assert "has no stored best checkpoint" in events[0].error_message  # type: ignore[attr-defined]
    await until_acked(bus)


async def test_cancel_stops_a_running_export_group_with_sigkill_after_the_grace(bus: Bus, runner: Runner) -> None:
    await bus.publish(StartExport(
        job_id="exp-slow", attempt=1, training_job_id="fake-train", export_format="onnx", checkpoint=_ref(),
        framework="fake", model_name="fake", task_type="image_classification",
    ))
    seen = run_events(bus, "export", "exp-slow", until=TERMINAL)
    started = await anext(seen)
    assert isinstance(started, ExportStarted) and started.pid
    pid_file = runner.settings.runner_work_dir / "exports" / "exp-slow" / "1" / "grandchild.pid"
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    grandchild = int(pid_file.read_text())
    # The exporter ran with its manifest's environment's interpreter, not the runner's.
    assert (runner.storage.root / "slowenv" / "starts").read_text().split() == ["started"]
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    await kv.put("exp-slow", json.dumps({"attempt": 1}).encode())
    rest = [event async for event in seen]
    assert isinstance(rest[-1], ExportCancelled) and rest[-1].seq == started.seq + len(rest)
    for pid in (started.pid, grandchild):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    await until_acked(bus)


async def test_an_inference_cancelled_before_it_is_claimed_never_starts(bus: Bus, runner: Runner) -> None:
    kv = await bus.kv(streams.KV_CANCELLATIONS)
    await kv.put("inf-early", json.dumps({"attempt": 1}).encode())
    await bus.publish(StartInference(
        job_id="inf-early", attempt=1, training_job_id="fake-train", checkpoint=_ref(), framework="fake",
        model_name="fake", task_type="image_classification", inference_type="batch",
        image_uris=sorted(runner.storage.images)[:1],
    ))
    events = await collect(bus, "infer", "inf-early")
    assert len(events) == 1 and isinstance(events[0], InferenceCancelled)
    await until_acked(bus)


async def test_shutdown_hands_a_running_export_back_without_a_terminal_event(bus: Bus, runner: Runner) -> None:
    await bus.publish(StartExport(
        job_id="exp-moved", attempt=1, training_job_id="fake-train", export_format="onnx", checkpoint=_ref(),
        framework="fake", model_name="fake", task_type="image_classification",
    ))
    started = [event async for event in run_events(bus, "export", "exp-moved", until={"started"})][-1]
    assert isinstance(started, ExportStarted) and started.attempt == 1
    runner.stop.set()
    await asyncio.wait_for(runner.task, timeout=30)
    with pytest.raises(ProcessLookupError):
        os.kill(started.pid or 0, 0)
    after = [event async for event in run_events(bus, "export", "exp-moved", until={"started"}, timeout=5)]
    assert [event.kind for event in after] == ["started"]  # only the first attempt's start: nothing terminal
    info = await bus.js.consumer_info(streams.RUNNER.stream, streams.RUNNER.durable)
    # Nak'ed, not acked: the command waits for the next runner (which runs it as attempt 2).
    assert info.num_ack_pending + info.num_pending == 1
    second = asyncio.Event()
    other = runner.settings.model_copy(update={"work_dir": runner.storage.root / "other", "runner_id": "second"})
    task = asyncio.create_task(serve(other, stop=second, manifests=[SLOW]))
    try:
        restarted = None
        async for event in run_events(bus, "export", "exp-moved", until=set(), timeout=30):
            if isinstance(event, ExportStarted) and event.attempt == 2:
                restarted = event
                break
        assert restarted is not None and restarted.runner_id == "second"
    finally:
        second.set()
        await asyncio.wait_for(task, timeout=30)


class CuttableLink:
    """A TCP forwarder between one client and nats-server that the test can cut and restore.

    Only the runner connects through it: cut, the runner is alone without its broker (its connection drops
    and every reconnect is refused) while the test's own connection still watches the stream.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))


async def test_an_export_stops_when_its_runner_loses_the_broker_for_longer_than_the_ack_wait(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    link = CuttableLink(nats_server.port)
    await link.open()
    async with running(bus, tmp_path, link.url, heartbeat_seconds=0.5, ack_wait=3.0) as runner:
        await bus.publish(StartExport(
            job_id="exp-cut", attempt=1, training_job_id="fake-train", export_format="onnx", checkpoint=_ref(),
            framework="fake", model_name="fake", task_type="image_classification",
        ))
        started = [event async for event in run_events(bus, "export", "exp-cut", until={"started"})][-1]
        assert isinstance(started, ExportStarted) and started.attempt == 1
        pid_file = runner.settings.runner_work_dir / "exports" / "exp-cut" / "1" / "grandchild.pid"
        for _ in range(200):
            if pid_file.is_file() and pid_file.read_text():
                break
            await asyncio.sleep(0.05)
        grandchild = int(pid_file.read_text())

        await link.cut()
        # Nothing can reach the runner now (no cancel, no shutdown): it stops the export group on its own,
        # once the broker has confirmed no heartbeat for longer than the ack wait.
        gone: set[int] = set()
        for _ in range(600):
            for pid in {started.pid or 0, grandchild} - gone:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    gone.add(pid)
            if len(gone) == 2:
                break
            await asyncio.sleep(0.05)
        assert gone == {started.pid, grandchild}, "the export outlived its runner's broker"

        await link.open()
        # Redelivered once the ack wait ran out: the runner, back on the broker, runs it again as a new attempt;
        # the stopped attempt published no terminal event (the job was not over, only this runner's hold on it).
        restarted = None
        async for event in run_events(bus, "export", "exp-cut", until=set(), timeout=60):
            assert event.kind not in TERMINAL, event
            if isinstance(event, ExportStarted) and event.attempt >= 2:
                restarted = event
                break
        assert restarted is not None and restarted.runner_id == runner.settings.runner_id
    await link.cut()
