"""Runner lifecycle rules on fakes: stall detection, per-job limits, and never re-running a finished job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from visionyard.runner.service import (
    AttemptOutcome,
    LaunchSpec,
    Outgoing,
    RunnerOptions,
    StagedCheckpoint,
    TrainingAttempts,
    job_limit,
)
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.events import FailureReason, JobFailed, JobStarted
from visionyard.shared.manifest import ModelInfo, TrainerManifest

MANIFEST = TrainerManifest(
    name="t", framework="pytorch", version="1", module="some.trainer", task_types=["image_classification"],
    models=[ModelInfo(model_name="simple_cnn", display_name="s", task_types=["image_classification"])],
    dataset_formats=["imagefolder"],
)


def command(**advanced: object) -> StartTraining:
    return StartTraining(
        job_id="j1", attempt=1, project_id="p", experiment_name="e",
        config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                              dataset_id="ds", advanced_config=dict(advanced) or None),
        dataset=DatasetRef(dataset_id="ds", content_hash="h"),
    )


class SilentTrainer:
    """Says one line, then nothing, and never exits by itself."""

    pid = 4321

    def __init__(self) -> None:
        self.stopped_with: list[float] = []
        self._exit = asyncio.Event()

    async def lines(self) -> AsyncIterator[tuple[str, str]]:
        yield ("stdout", "loading")
        await self._exit.wait()

    async def wait(self) -> int:
        await self._exit.wait()
        return -15

    async def stop(self, *, grace: float) -> int:
        self.stopped_with.append(grace)
        self._exit.set()
        return -15


class Launcher:
    def __init__(self, trainer: SilentTrainer) -> None:
        self.trainer = trainer
        self.specs: list[LaunchSpec] = []

    async def launch(self, spec: LaunchSpec) -> SilentTrainer:
        self.specs.append(spec)
        return self.trainer


class Sink:
    def __init__(self) -> None:
        self.items: list[Outgoing] = []

    def emit(self, item: Outgoing) -> None:
        self.items.append(item)

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Stager:
    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        return Path("/data")

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        return None


class Ledger:
    def __init__(self, attempt: int | None = None) -> None:
        self.attempt = attempt

    async def cancelled_attempt(self, job_id: str) -> int | None:
        return None

    async def terminal_attempt(self, job_id: str) -> int | None:
        return self.attempt


def attempts_with(tmp_path: Path, *, stall: float = 0.0, terminal: int | None = None) -> tuple[TrainingAttempts, Sink, Launcher]:
    sink, launcher = Sink(), Launcher(SilentTrainer())
    attempts = TrainingAttempts(
        options=RunnerOptions(runner_id="r", work_dir=tmp_path, trainer_python="/py", base_env={},
                              cancel_grace_seconds=0.5, stall_seconds=stall),
        manifests=[MANIFEST], stager=Stager(), launcher=launcher, ledger=Ledger(), new_sink=lambda: sink,
        terminal=Ledger(terminal),
    )
    return attempts, sink, launcher


async def test_a_silent_trainer_is_stopped_and_the_job_fails_as_stalled(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path, stall=0.3)
    outcome = await asyncio.wait_for(attempts.run(command(), delivered=1, final_delivery=False), timeout=10)
    assert outcome is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.STALLED
    assert launcher.trainer.stopped_with[0] == 0.5  # SIGTERM with the grace period first


async def test_the_job_config_sets_its_own_stall_limit(tmp_path: Path) -> None:
    attempts, sink, _ = attempts_with(tmp_path, stall=0)  # the runner default would never stop it
    await asyncio.wait_for(attempts.run(command(stall_seconds=0.3), delivered=1, final_delivery=False), timeout=10)
    assert isinstance(sink.items[-1], JobFailed) and sink.items[-1].reason is FailureReason.STALLED


async def test_a_wall_clock_limit_from_the_job_config_fails_it_as_timeout(tmp_path: Path) -> None:
    attempts, sink, _ = attempts_with(tmp_path)
    await asyncio.wait_for(attempts.run(command(timeout_seconds=0.3), delivered=1, final_delivery=False), timeout=10)
    assert isinstance(sink.items[-1], JobFailed) and sink.items[-1].reason is FailureReason.TIMEOUT


async def test_a_redelivered_command_of_a_finished_job_is_acked_without_running(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path, terminal=1)
    assert await attempts.run(command(), delivered=2, final_delivery=False) is AttemptOutcome.FINISHED
    assert sink.items == [] and launcher.specs == []


async def test_a_restart_after_a_finished_attempt_runs(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path, terminal=1, stall=0.2)
    cmd = command().model_copy(update={"attempt": 2})
    await asyncio.wait_for(attempts.run(cmd, delivered=1, final_delivery=False), timeout=10)
    assert launcher.specs and isinstance(sink.items[0], JobStarted)


def test_job_limits_ignore_unreadable_values() -> None:
    assert job_limit(command(stall_seconds="soon"), "stall_seconds", default=7.0) == 7.0
    assert job_limit(command(stall_seconds=-1), "stall_seconds", default=7.0) == 7.0
    assert job_limit(command(stall_seconds=12), "stall_seconds", default=7.0) == 12.0


async def test_the_last_delivery_after_lost_runners_fails_the_attempt_instead_of_running(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path)
    assert await attempts.run(command(), delivered=5, final_delivery=True) is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.INFRASTRUCTURE and failed.retryable
    assert launcher.specs == []  # no trainer was started that nobody could take over again
