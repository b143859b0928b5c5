"""The scheduler (as the API runs it) and real runners (their service in-process, real trainer subprocesses)
on a real nats-server: priority order, fair share, quotas with their reason, and a scheduler replaced after
it died mid-admission — no job lost, none started twice.

Jobs are queued the way the API's outbox does it: a `QueueRequest` put into `sched_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from visionyard.api.adapters.scheduling_kv import BusCommandSender
from visionyard.api.scheduling.handlers import SchedulerRuntime, subscribe
from visionyard.runner.config import RunnerSettings
from visionyard.runner.main import serve
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, responder, service_broker
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.manifest import TrainerManifest
from visionyard.shared.requests import StageReply, StageRequest
from visionyard.shared.scheduling import (
    LEADER_KEY,
    PositionShard,
    ProjectPolicy,
    QueueRequest,
    position_shard,
)

pytestmark = pytest.mark.integration

# Reports, then waits for its release file (created up front for a job that should end at once).
HOLDING_TRAINER = r'''
import time
from pathlib import Path
from visionyard.shared.sdk import Reporter, load_job
job = load_job()
reporter = Reporter.from_env(outbox_dir=job.outbox_dir)
release = Path((job.config.advanced_config or {})["release_file"])
while not release.exists():
    time.sleep(0.05)
reporter.progress(1, 1, {"loss": 1.0})
reporter.result(final_metrics={"loss": 1.0}, epochs_completed=1)
'''
HOLDER = TrainerManifest.model_validate(dict(
    name="holder", framework="holder", version="0", module="vy_sched_trainer", task_types=["detection"],
    models=[{"model_name": "h", "display_name": "h", "task_types": ["detection"]}], dataset_formats=["yolo"],
))


async def until(predicate: Callable[[], Awaitable[Any]], *, timeout: float = 90.0, what: str = "condition") -> Any:
    """Poll until `predicate` returns something truthy (a bounded wait on observable state, never a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        await asyncio.sleep(0.1)


@pytest.fixture
async def staged(bus: Bus, tmp_path: Path) -> AsyncIterator[str]:
    """Fake storage answering `storage.stage` with a tiny dataset zip (until the test ends); its content hash."""
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("data.yaml", "names: [a]\n")
    content_hash = hashlib.sha256(archive.read_bytes()).hexdigest()

    async def stage(request: StageRequest) -> StageReply:  # a well-formed request, or the runner's call fails
        name = f"dataset/{content_hash}.zip"
        sha, size = await bus.put_file(name, archive)
        return StageReply(ok=True, object_name=name, sha256=sha, size_bytes=size)

    # Storage's responder, as storage declares it (through the FastStream binders), on the test's connection.
    broker = attached(bus, service="storage")
    responder(broker, subjects.STORAGE_STAGE, queue="storage")(stage)
    await broker.start()
    yield content_hash
    await broker.stop()


class Harness:
    """Queues jobs, runs runners and schedulers, and reads what happened from the EVENTS stream."""

    def __init__(self, bus: Bus, nats_url: str, content_hash: str, tmp_path: Path) -> None:
        self.bus = bus
        self.nats_url = nats_url
        self.content_hash = content_hash
        self.tmp_path = tmp_path
        self.tasks: list[tuple[asyncio.Event, asyncio.Task[None], Bus | None]] = []
        self.clock = 1_000.0
        trainer_path = tmp_path / "trainer_path"
        trainer_path.mkdir(exist_ok=True)
        (trainer_path / "vy_sched_trainer.py").write_text(HOLDING_TRAINER)
        self.trainer_path = trainer_path

    def release_file(self, job_id: str) -> Path:
        return self.tmp_path / f"release-{job_id}"

    async def queue(self, job_id: str, *, project: str, priority: int = 50, held: bool = False, gpus: int = 0) -> None:
        """Queue a job as the API's outbox does; `held`: its trainer waits for `release(job_id)`."""
        if not held:
            self.release_file(job_id).touch()
        self.clock += 1.0
        devices: dict[str, Any] = {"device": "gpu", "gpu_count": gpus} if gpus else {}
        command = StartTraining(
            message_id=f"train-{job_id}-1", job_id=job_id, attempt=1, project_id=project, experiment_name="e",
            config=TrainingConfig(framework="holder", model_name="h", task_type="detection", dataset_id="d",
                                  advanced_config={"release_file": str(self.release_file(job_id)), **devices}),
            dataset=DatasetRef(dataset_id="d", content_hash=self.content_hash),
        )
        request = QueueRequest(job_id=job_id, attempt=1, project_id=project, priority=priority, queued_at=self.clock,
                               gpus=gpus, command=command)
        kv = await self.bus.kv(streams.KV_SCHED_REQUESTS)
        await kv.put(job_id, request.model_dump_json().encode())

    def release(self, job_id: str) -> None:
        self.release_file(job_id).touch()

    async def set_policy(self, project: str, policy: ProjectPolicy) -> None:
        kv = await self.bus.kv(streams.KV_SCHED_PROJECTS)
        await kv.put(project, policy.model_dump_json().encode())

    def start_runner(self, name: str, *, slots: int, fake_gpus: int = 0) -> None:
        settings = RunnerSettings(
            nats_url=self.nats_url, data_dir=self.tmp_path / name, runner_id=name, slots=slots, heartbeat_seconds=1.0,
            cancel_grace_seconds=1.0, trainer_python=sys.executable, ack_wait=4.0, advertise_seconds=1.0,
            fake_gpus=fake_gpus,
            trainer_base_env={"PATH": os.environ.get("PATH", ""),
                              "PYTHONPATH": os.pathsep.join([str(self.trainer_path), *sys.path])},
        )
        stop = asyncio.Event()
        self.tasks.append((stop, asyncio.create_task(serve(settings, stop=stop, manifests=[HOLDER])), None))

    async def start_scheduler(self, name: str, *, sender: Any = None) -> tuple[SchedulerRuntime, Bus, asyncio.Task[None]]:
        """A scheduler on its own connection, as an API replica runs it."""
        broker = service_broker(self.nats_url, service=f"api-{name}")
        own = await Bus.from_broker(broker)
        runtime = SchedulerRuntime(own, scheduler_id=name, sender=sender)
        subscribe(broker, runtime)
        stop = asyncio.Event()

        async def lead() -> None:
            await broker.start()
            try:
                await stop.wait()
            finally:
                await broker.stop_subscribers()

        task = asyncio.create_task(lead())
        self.tasks.append((stop, task, own))
        return runtime, own, task

    async def started_order(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every `started` event, in stream order."""
        return [(event["job_id"], event["attempt"]) for event in await self._events("started")]

    async def completed(self) -> set[str]:
        return {event["job_id"] for event in await self._events("completed")}

    async def _events(self, kind: str) -> list[dict[str, Any]]:
        info = await self.bus.js.stream_info(streams.EVENTS.name)
        if not info.state.messages:
            return []
        subscription = await self.bus.js.subscribe(subjects.job_event("*", kind), ordered_consumer=True)
        found: list[dict[str, Any]] = []
        try:
            while True:
                try:
                    msg = await subscription.next_msg(timeout=0.5)
                except Exception:
                    return found
                found.append(json.loads(msg.data))
        finally:
            await subscription.unsubscribe()

    async def position(self, job_id: str) -> dict[str, Any] | None:
        kv = await self.bus.kv(streams.KV_SCHED_STATUS)
        try:
            entry = await kv.get(position_shard(job_id))
        except Exception:
            return None
        shard = PositionShard.model_validate_json(entry.value or b"{}")
        found = shard.jobs.get(job_id)
        return found.model_dump() if found else None

    async def stop_all(self) -> None:
        for stop, _, _ in self.tasks:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*(task for _, task, _ in self.tasks), return_exceptions=True), timeout=60)
        for _, _, own in self.tasks:
            if own is not None:
                await own.close()


@pytest.fixture
async def harness(bus: Bus, nats_server: Any, staged: str, tmp_path: Path) -> AsyncIterator[Harness]:
    made = Harness(bus, nats_server.url, staged, tmp_path)
    try:
        yield made
    finally:
        for job_file in tmp_path.glob("release-*"):
            job_file.touch()
        for job_id in ("a1", "a2", "a3", "b1", "g1", "g2", "c1"):
            made.release(job_id)
        await made.stop_all()


async def test_priority_then_fair_share_then_fifo_on_a_real_runner(harness: Harness) -> None:
    # Queued before any runner is there: everything waits, saying so.
    for index in range(1, 7):
        await harness.queue(f"p1-{index}", project="1")
    for index in range(1, 4):
        await harness.queue(f"p2-{index}", project="2")
    await harness.queue("p2-high-1", project="2", priority=100)
    await harness.queue("p1-low", project="1", priority=0)
    await harness.queue("p2-high-2", project="2", priority=100)
    await harness.start_scheduler("s1")

    async def no_runner() -> Any:
        found = await harness.position("p1-1")
        return found if found and found["reason"] == "no_runner" else None

    await until(no_runner, what="the reason no_runner")
    harness.start_runner("r1", slots=1)  # one slot: jobs start one at a time, in the scheduler's order
    everything = {f"p1-{i}" for i in range(1, 7)} | {f"p2-{i}" for i in range(1, 4)} | {"p2-high-1", "p2-high-2", "p1-low"}

    async def all_done() -> bool:
        return await harness.completed() >= everything

    await until(all_done, timeout=180, what="every job completed")
    order = [job_id for job_id, _ in await harness.started_order()]
    assert sorted(order) == sorted(everything), "each job started exactly once"
    assert order[:2] == ["p2-high-1", "p2-high-2"]  # high first, in the order they were queued
    assert order[-1] == "p1-low"  # low last, although queued before a high one
    normal = order[2:-1]
    for project in ("p1-", "p2-"):
        mine = [job_id for job_id in normal if job_id.startswith(project)]
        assert mine == sorted(mine, key=lambda text: int(text.rsplit("-", 1)[1])), "FIFO within a project"
    # Fair share (equal weights, counted over starts at every priority): project 2 started both high jobs, so
    # project 1 catches up by two, then they alternate while both wait; the deep queue never starves the other.
    assert normal[:2] == ["p1-1", "p1-2"]
    assert [job_id[:2] for job_id in normal[2:8]] == ["p1", "p2", "p1", "p2", "p1", "p2"]


async def test_a_project_over_its_quota_waits_with_the_reason_until_its_job_ends(harness: Harness) -> None:
    await harness.set_policy("1", ProjectPolicy(max_running_jobs=1))
    await harness.start_scheduler("s1")
    harness.start_runner("r1", slots=3)
    await harness.queue("a1", project="1", held=True)
    await harness.queue("a2", project="1", held=True)
    await harness.queue("b1", project="2", held=True)

    async def two_started() -> list[str] | None:
        started = {job_id for job_id, _ in await harness.started_order()}
        return sorted(started) if started >= {"a1", "b1"} else None

    assert await until(two_started, what="a1 and b1 started") == ["a1", "b1"]

    async def quota_reason() -> dict[str, Any] | None:
        found = await harness.position("a2")
        return found if found and found["reason"] == "quota" else None

    waiting = await until(quota_reason, what="a2 waiting on its project's quota")
    assert waiting["detail"] == "project 1 runs 1 of its 1 allowed job"
    assert "a2" not in {job_id for job_id, _ in await harness.started_order()}  # a slot is free, but not for it
    harness.release("a1")

    async def a2_started() -> bool:
        return "a2" in {job_id for job_id, _ in await harness.started_order()}

    await until(a2_started, what="a2 started once a1 ended")
    for job_id in ("a2", "b1"):
        harness.release(job_id)


async def test_gpu_jobs_wait_for_their_projects_gpu_quota_and_for_a_runner_with_enough_gpus(harness: Harness) -> None:
    await harness.set_policy("1", ProjectPolicy(max_gpus=1))
    await harness.start_scheduler("s1")
    harness.start_runner("r1", slots=4, fake_gpus=2)
    await harness.queue("g1", project="1", held=True, gpus=1)
    await harness.queue("g2", project="1", held=True, gpus=1)
    await harness.queue("big", project="2", held=True, gpus=4)
    await harness.queue("c1", project="2", held=True)

    async def started() -> set[str]:
        return {job_id for job_id, _ in await harness.started_order()}

    async def first_two() -> bool:
        return await started() >= {"g1", "c1"}

    await until(first_two, what="g1 (one GPU) and c1 (cpu) started")

    async def reasons() -> tuple[str, str] | None:
        g2, big = await harness.position("g2"), await harness.position("big")
        found = (g2 or {}).get("reason"), (big or {}).get("reason")
        return found if found == ("quota", "no_device") else None  # type: ignore[return-value]

    await until(reasons, what="g2 held by its project's GPU quota, big by no runner with 4 GPUs")
    assert (await harness.position("big"))["detail"] == "no runner has 4 GPUs (the most any connected runner has is 2)"  # type: ignore[index]
    # One GPU is free, but project 1 may hold only one: g2 waits until g1 ends.
    assert "g2" not in await started()
    harness.release("g1")

    async def g2_started() -> bool:
        return "g2" in await started()

    await until(g2_started, what="g2 started once g1 gave its GPU back")
    for job_id in ("g2", "c1", "big"):
        harness.release(job_id)


class FreezingSender:
    """Sends like the real one until told to freeze: then the next send never returns (a process that hung or
    died after writing the admission record and before publishing the command)."""

    def __init__(self, bus: Bus) -> None:
        self._real = BusCommandSender(bus)
        self.freeze = False
        self.frozen = asyncio.Event()

    async def send_once(self, subject: str, payload: bytes, *, message_id: str, headers: dict[str, str]) -> bool:
        if self.freeze:
            self.frozen.set()
            await asyncio.Event().wait()
        return await self._real.send_once(subject, payload, message_id=message_id, headers=headers)


async def test_a_scheduler_that_dies_mid_admission_is_replaced_and_no_job_is_lost_or_started_twice(
    harness: Harness,
) -> None:
    harness.start_runner("r1", slots=2)
    sender = FreezingSender(harness.bus)
    first, first_bus, first_task = await harness.start_scheduler("first", sender=sender)
    kv = await harness.bus.kv(streams.KV_SCHED_LEADER)

    async def leading() -> bool:
        with contextlib.suppress(Exception):
            return (await kv.get(LEADER_KEY)).value == b"first"
        return False

    await until(leading, what="the first scheduler holding the lease")
    await harness.queue("j1", project="1")

    async def j1_started() -> bool:
        return "j1" in {job_id for job_id, _ in await harness.started_order()}

    await until(j1_started, what="j1 started")
    # The next admission writes its record, then hangs before the command is published.
    sender.freeze = True
    for index in range(2, 7):
        await harness.queue(f"j{index}", project="1")
    await asyncio.wait_for(sender.frozen.wait(), timeout=30)
    # Killed: its connection drops without giving the lease up; a standby replica is waiting for it.
    await harness.start_scheduler("second")
    await first_bus.nc.close()
    first_task.cancel()

    async def second_leads() -> bool:
        with contextlib.suppress(Exception):
            return (await kv.get(LEADER_KEY)).value == b"second"
        return False

    await until(second_leads, timeout=60, what="the standby scheduler taking over")
    expected = {f"j{index}" for index in range(1, 7)}

    async def all_done() -> bool:
        return await harness.completed() >= expected

    await until(all_done, timeout=120, what="every job completed after the takeover")
    started = await harness.started_order()
    assert sorted(started) == sorted((job_id, 1) for job_id in expected), "each job started once, attempt 1"
    commands = await harness.bus.js.stream_info(streams.COMMANDS.name)
    assert commands.state.messages == 0  # every command was acknowledged: none is left to start again
