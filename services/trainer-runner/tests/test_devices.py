"""Devices: runners advertise cpu and GPUs (fake ones here), each job gets its own CUDA_VISIBLE_DEVICES,
and a GPU job waits, unclaimed, until a runner has that many free GPUs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError

from visionyard.runner.config import RunnerSettings
from visionyard.runner.devices import GpuPool, detect_gpus
from visionyard.runner.main import serve
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.devices import InvalidDeviceRequest, assigned_device, device_request
from visionyard.shared.events import JobCompleted, JobEvent, LogEmitted, decode_job_event
from visionyard.shared.manifest import TrainerManifest
from visionyard.shared.requests import StageReply, StageRequest

from .fakes import answering

# Reports what devices it was given, then waits for its release file (so the test decides when it ends).
HOLDING_TRAINER = r'''
import os, time
from pathlib import Path
from visionyard.shared.sdk import Reporter, load_job
job = load_job()
reporter = Reporter.from_env(outbox_dir=job.outbox_dir)
advanced = job.config.advanced_config or {}
reporter.log("devices", event_type="devices",
             data={"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": advanced.get("device")})
release = Path(advanced["release_file"])
while not release.exists():
    time.sleep(0.05)
reporter.progress(1, 1, {"loss": 1.0})
reporter.result(final_metrics={"loss": 1.0}, epochs_completed=1)
'''

HOLDER = TrainerManifest.model_validate(dict(
    name="holder", framework="holder", version="0", module="vy_holding_trainer", task_types=["detection"],
    models=[{"model_name": "h", "display_name": "h", "task_types": ["detection"]}], dataset_formats=["yolo"],
))


def test_device_requests_and_their_subjects() -> None:
    assert device_request(None).subject == "cmd.train"
    assert device_request({"device": "cpu"}).kind == "cpu"
    gpu = device_request({"device": "gpu", "gpu_count": 2})
    assert (gpu.kind, gpu.gpus, gpu.subject, assigned_device(gpu)) == ("gpu", 2, "cmd.train.gpu.2", "0,1")
    assert device_request({"device": "GPU"}).subject == "cmd.train.gpu.1"
    for bad, field in (({"device": "tpu"}, "advanced_config.device"), ({"device": "gpu", "gpu_count": 0},
                       "advanced_config.gpu_count"), ({"device": "gpu", "gpu_count": "2"}, "advanced_config.gpu_count"),
                       ({"gpu_count": 1}, "advanced_config.gpu_count"), ({"device": "gpu", "gpu_count": 9},
                       "advanced_config.gpu_count")):
        with pytest.raises(InvalidDeviceRequest) as error:
            device_request(bad)
        assert error.value.field == field


def test_gpu_pool_hands_out_only_free_gpus() -> None:
    pool = GpuPool(gpus=["0", "1", "2"])
    first = pool.take(2)
    assert first == ["0", "1"] and pool.free == 1
    assert pool.take(2) is None and pool.free == 1  # nothing taken when too few are free
    pool.give_back(first)
    assert pool.take(3) == ["0", "1", "2"]
    assert detect_gpus("none") == [] and detect_gpus("3, 5") == ["3", "5"]


@pytest.fixture
async def staged(bus: Bus, tmp_path: Path) -> AsyncIterator[str]:
    """Fake storage answering `storage.stage` with a tiny dataset zip (until the test ends); its content hash."""
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data.yaml", "names: [a]\n")
    content_hash = hashlib.sha256(archive.read_bytes()).hexdigest()

    async def stage(request: StageRequest) -> StageReply:
        if request.content_hash != content_hash:
            return StageReply(ok=False, error="no such dataset")
        name = f"dataset/{content_hash}.zip"
        sha, size = await bus.put_file(name, archive)
        return StageReply(ok=True, object_name=name, sha256=sha, size_bytes=size)

    async with answering(bus, "storage", {subjects.STORAGE_STAGE: stage}):
        yield content_hash


def settings_for(nats_url: str, tmp_path: Path, name: str, *, fake_gpus: int) -> RunnerSettings:
    trainer_path = tmp_path / "trainer_path"
    trainer_path.mkdir(exist_ok=True)
    (trainer_path / "vy_holding_trainer.py").write_text(HOLDING_TRAINER)
    return RunnerSettings(
        nats_url=nats_url, data_dir=tmp_path / name, runner_id=name, slots=3, heartbeat_seconds=1.0,
        cancel_grace_seconds=1.0, trainer_python=sys.executable, fake_gpus=fake_gpus,
        trainer_base_env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(trainer_path), *sys.path])},
    )


async def publish_job(bus: Bus, content_hash: str, tmp_path: Path, job_id: str, **device: Any) -> Path:
    release = tmp_path / f"release-{job_id}"
    cmd = StartTraining(
        job_id=job_id, attempt=1, project_id="p", experiment_name="e",
        config=TrainingConfig(framework="holder", model_name="h", task_type="detection", dataset_id="d",
                              advanced_config={"release_file": str(release), **device}),
        dataset=DatasetRef(dataset_id="d", content_hash=content_hash),
    )
    await bus.publish(cmd, subject=device_request(cmd.config.advanced_config).subject)
    return release


async def events_until(bus: Bus, job_id: str, predicate: Any, *, timeout: float = 90) -> JobEvent:
    """The first event of `job_id` (from the start of its stream) that satisfies `predicate`."""
    sub = await bus.js.subscribe(subjects.job_events(job_id), ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            event = decode_job_event(msg.subject, msg.data)
            if predicate(event):
                return event
    finally:
        await sub.unsubscribe()


async def devices_of(bus: Bus, job_id: str) -> dict[str, Any]:
    event = await events_until(bus, job_id, lambda e: isinstance(e, LogEmitted) and e.event_type == "devices")
    assert isinstance(event, LogEmitted) and event.data is not None
    return event.data


async def completed(bus: Bus, job_id: str) -> None:
    event = await events_until(bus, job_id, lambda e: e.kind in {"completed", "failed", "cancelled"})
    assert isinstance(event, JobCompleted), event


async def consumer_counts(bus: Bus, durable: str) -> tuple[int, int]:
    info = await bus.js.consumer_info(streams.COMMANDS.name, durable)
    return info.num_pending, info.num_ack_pending


@pytest.mark.integration
async def test_gpu_jobs_wait_for_free_gpus_and_each_job_sees_only_its_own(
    bus: Bus, nats_server, staged: str, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    first_runner = settings_for(nats_server.url, tmp_path, "one-gpu", fake_gpus=1)
    stop_first = asyncio.Event()
    runners = [asyncio.create_task(serve(first_runner, stop=stop_first, manifests=[HOLDER]))]
    stop_second = asyncio.Event()
    try:
        release_g1 = await publish_job(bus, staged, tmp_path, "g1", device="gpu")
        assert await devices_of(bus, "g1") == {"cuda": "0", "device": "0"}
        release_g2 = await publish_job(bus, staged, tmp_path, "g2", device="gpu", gpu_count=1)
        release_c1 = await publish_job(bus, staged, tmp_path, "c1")
        release_big = await publish_job(bus, staged, tmp_path, "big", device="gpu", gpu_count=2)
        # The CPU job runs beside g1 (a free slot) and sees no GPU ...
        assert await devices_of(bus, "c1") == {"cuda": "", "device": "cpu"}
        # ... while g2 waits unclaimed in the stream: g1 holds the only GPU (slots are free).
        assert await consumer_counts(bus, "runner-gpu-1") == (1, 1)
        kv = await bus.kv(streams.KV_RUNNER_DEVICES)
        advertised = json.loads((await kv.get("one-gpu")).value)
        assert (advertised["gpus"], advertised["free_gpus"], advertised["fake_gpus"]) == (["0"], [], True)

        release_g1.touch()
        await completed(bus, "g1")
        assert await devices_of(bus, "g2") == {"cuda": "0", "device": "0"}  # the freed GPU went to g2

        # Nobody has two GPUs: `big` is still in the stream, never delivered (waiting costs no attempt).
        pending = await bus.js.stream_info(streams.COMMANDS.name, subjects_filter="cmd.train.gpu.2")
        assert pending.state.subjects == {"cmd.train.gpu.2": 1}
        second_runner = settings_for(nats_server.url, tmp_path, "two-gpus", fake_gpus=2)
        runners.append(asyncio.create_task(serve(second_runner, stop=stop_second, manifests=[HOLDER])))
        assert await devices_of(bus, "big") == {"cuda": "0,1", "device": "0,1"}
        started = await events_until(bus, "big", lambda e: e.kind == "started")
        assert started.runner_id == "two-gpus" and started.attempt == 1  # type: ignore[attr-defined]

        for release in (release_g2, release_c1, release_big):
            release.touch()
        for job_id in ("g2", "c1", "big"):
            await completed(bus, job_id)
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.wait_for(asyncio.gather(*runners), timeout=60)
    kv = await bus.kv(streams.KV_RUNNER_DEVICES)
    for runner_id in ("one-gpu", "two-gpus"):  # a stopped runner withdraws its advertisement
        with pytest.raises(KeyNotFoundError):  # nats-py reports a deleted key as not found
            await kv.get(runner_id)
