"""Unit tests: SDK line → event translation, exit classification, and the attempt use case with fakes
(including stall detection, per-job limits and never re-running a finished job)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from visionyard.runner.cadence import CheckpointReported
from visionyard.runner.ports import CheckpointDeclared, LaunchSpec, StagedCheckpoint
from visionyard.runner.service import (
    AttemptEvents,
    AttemptOutcome,
    HeldJobs,
    RunnerOptions,
    StopReason,
    TrainerExit,
    TrainingAttempts,
    effective_attempt,
    job_limit,
)
from visionyard.shared.bus import TransientError
from visionyard.shared.commands import DatasetRef, StartTraining, TrainingConfig
from visionyard.shared.events import (
    FailureReason,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.manifest import ModelInfo, TrainerManifest

from .fakes import ListSink


def command(**overrides: object) -> StartTraining:
    base: dict[str, object] = dict(
        job_id="job-1", attempt=1, project_id="p", experiment_name="exp",
        config=TrainingConfig(framework="pytorch", model_name="simple_cnn", task_type="image_classification",
                              dataset_id="ds", epochs=2),
        dataset=DatasetRef(dataset_id="ds", content_hash="abc"),
    )
    base.update(overrides)
    return StartTraining(**base)  # type: ignore[arg-type]


def sdk(**record: object) -> str:
    return json.dumps(record)


def test_sdk_lines_become_events_with_monotonic_seq() -> None:
    events = AttemptEvents(job_id="j", attempt=3)
    started = events.started(command(), runner_id="r1", pid=42, resumed_from_epoch=None)
    progress = events.from_sdk_line(sdk(type="progress", epoch=1, total_epochs=2, metrics={"loss": 0.5}))
    garbage = events.from_sdk_line("{not json")
    log = events.from_output("stderr", "warning: slow\n")
    reported = events.from_sdk_line(sdk(type="checkpoint", kind="best", path="/tmp/x.pt", epoch=1))
    assert isinstance(reported, CheckpointReported) and reported.epoch == 1
    checkpoint = events.checkpoint(reported)
    assert events.from_sdk_line(sdk(type="result", final_metrics={"accuracy": 0.9}, epochs_completed=2)) is None
    completed = events.terminal(TrainerExit(returncode=0))
    assert isinstance(started, JobStarted) and started.params["epochs"] == 2 and started.dataset_hash == "abc"
    assert isinstance(progress, ProgressReported) and progress.metrics == {"loss": 0.5}
    assert isinstance(garbage, LogEmitted) and garbage.level == "WARNING"
    assert isinstance(log, LogEmitted) and (log.event_type, log.level, log.message) == ("stderr", "ERROR", "warning: slow")
    assert isinstance(checkpoint, CheckpointDeclared) and checkpoint.object_name == "ckpt/j/3/5-best.pt"
    assert isinstance(completed, JobCompleted)
    assert completed.declared_checkpoints == ["best"] and completed.final_metrics == {"accuracy": 0.9}
    seqs = [e.seq for e in (started, progress, garbage, log, checkpoint, completed)]  # type: ignore[union-attr]
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert {e.attempt for e in (started, progress, completed)} == {3}  # type: ignore[union-attr]


def test_a_malformed_progress_line_leaves_no_gap_in_seq() -> None:
    events = AttemptEvents(job_id="j", attempt=1)
    bad = events.from_sdk_line(sdk(type="progress", epoch="one", total_epochs=2))
    good = events.from_sdk_line(sdk(type="progress", epoch=1, total_epochs=2))
    assert isinstance(bad, LogEmitted) and bad.seq == 1
    assert isinstance(good, ProgressReported) and good.seq == 2


@pytest.mark.parametrize(
    ("exit_", "expected"),
    [
        (TrainerExit(returncode=2, stderr_tail=("error: no images",)), FailureReason.USER_ERROR),
        (TrainerExit(returncode=1, stderr_tail=("Traceback", "KeyError: x")), FailureReason.TRAINER_CRASH),
        (TrainerExit(returncode=-9), FailureReason.TRAINER_CRASH),
        (TrainerExit(returncode=-9, stopped_by=StopReason.TIMEOUT), FailureReason.TIMEOUT),
    ],
)
def test_failures_are_classified(exit_: TrainerExit, expected: FailureReason) -> None:
    event = AttemptEvents(job_id="j", attempt=1).terminal(exit_)
    assert isinstance(event, JobFailed) and event.reason is expected
    if expected is FailureReason.USER_ERROR:
        assert event.error_message == "error: no images"
    if exit_.returncode == -9 and expected is FailureReason.TRAINER_CRASH:
        assert "SIGKILL" in event.error_message


def test_cancel_is_cancelled_and_shutdown_publishes_no_terminal_event() -> None:
    events = AttemptEvents(job_id="j", attempt=1)
    assert isinstance(events.terminal(TrainerExit(returncode=143, stopped_by=StopReason.CANCEL)), JobCancelled)
    assert events.terminal(TrainerExit(returncode=143, stopped_by=StopReason.SHUTDOWN)) is None


def test_effective_attempt_counts_redeliveries() -> None:
    assert effective_attempt(command(attempt=2), delivered=1) == 2
    assert effective_attempt(command(attempt=2), delivered=3) == 4


def test_held_jobs_fence_cancels_of_older_attempts() -> None:
    held = HeldJobs()
    control = held.hold(command(attempt=2))
    assert held.request_cancel("job-1", 1) is False and control.reason is None
    assert held.request_cancel("job-1", 2) is True and control.reason is StopReason.CANCEL


def test_a_redelivery_held_beside_its_lost_delivery_stops_that_one_and_a_lost_stop_reaches_only_its_own() -> None:
    held = HeldJobs()
    first = held.hold(command(attempt=1), delivered=1)
    second = held.hold(command(attempt=1), delivered=2)  # the broker redelivered while the first winds down
    assert first.reason is StopReason.BROKER_LOST and second.reason is None
    held.request_stop("job-1", StopReason.BROKER_LOST, delivered=1)  # the first delivery's own lost stop
    assert second.reason is None
    held.release(first)
    assert len(held) == 1 and held.request_cancel("job-1", 1) is True and second.reason is StopReason.CANCEL
    held.release(second)
    assert len(held) == 0


def test_shutdown_reaches_every_held_delivery_and_any_held_after_it() -> None:
    held = HeldJobs()
    controls = [held.hold(command(attempt=1), delivered=1), held.hold(command(job_id="job-2"))]
    held.stop_all(StopReason.SHUTDOWN)
    late = held.hold(command(job_id="job-3"))  # claimed as the runner stopped
    assert [control.reason for control in [*controls, late]] == [StopReason.SHUTDOWN] * 3


# -- the use case with fakes -----------------------------------------------------------------------


class FakeStager:
    def __init__(self, *, error: Exception | None = None) -> None:
        self.error = error
        self.checkpoint_requests: list[str] = []

    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        if self.error:
            raise self.error
        return Path("/data") / dataset.content_hash

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        self.checkpoint_requests.append(kind)
        return StagedCheckpoint(path=destination / "last.pt", epoch=4)


class FakeTrainer:
    def __init__(self, lines: list[tuple[str, str]], code: int) -> None:
        self.pid = 1234
        self._lines = lines
        self._code = code
        self.stopped = False

    async def lines(self) -> AsyncIterator[tuple[str, str]]:
        for line in self._lines:
            yield line

    async def wait(self) -> int:
        return self._code

    async def stop(self, *, grace: float) -> int:
        self.stopped = True
        return self._code


class FakeLauncher:
    def __init__(self, trainer: FakeTrainer) -> None:
        self.trainer = trainer
        self.specs: list[LaunchSpec] = []

    async def launch(self, spec: LaunchSpec) -> FakeTrainer:
        self.specs.append(spec)
        return self.trainer


class FakeLedger:
    def __init__(self, cancelled: int | None = None) -> None:
        self.cancelled = cancelled

    async def cancelled_attempt(self, job_id: str) -> int | None:
        return self.cancelled


MANIFEST = TrainerManifest(
    name="t", framework="pytorch", version="1", module="some.trainer", task_types=["image_classification"],
    models=[ModelInfo(model_name="simple_cnn", display_name="s", task_types=["image_classification"])],
    dataset_formats=["imagefolder"],
)


def attempts_with(tmp_path: Path, *, trainer: FakeTrainer | None = None, stager: FakeStager | None = None,
                  ledger: FakeLedger | None = None) -> tuple[TrainingAttempts, ListSink, FakeLauncher]:
    sink = ListSink()
    launcher = FakeLauncher(trainer or FakeTrainer([], 0))
    attempts = TrainingAttempts(
        options=RunnerOptions(runner_id="r", work_dir=tmp_path, trainer_python="/py", base_env={"PATH": "/bin"},
                              cancel_grace_seconds=1),
        manifests=[MANIFEST], stager=stager or FakeStager(), launcher=launcher, ledger=ledger or FakeLedger(),
        new_sink=lambda: sink,
    )
    return attempts, sink, launcher


async def test_a_finished_trainer_yields_started_then_its_events_then_completed(tmp_path: Path) -> None:
    trainer = FakeTrainer([("sdk", sdk(type="progress", epoch=1, total_epochs=1)), ("stdout", "hello")], 0)
    attempts, sink, launcher = attempts_with(tmp_path, trainer=trainer)
    outcome = await attempts.run(command(), delivered=1, final_delivery=False)
    assert outcome is AttemptOutcome.FINISHED
    kinds = [type(item).__name__ for item in sink.items]
    assert kinds == ["JobStarted", "ProgressReported", "LogEmitted", "JobCompleted"]
    spec = launcher.specs[0]
    assert spec.argv == ["/py", "-m", "some.trainer"]
    assert set(spec.env) == {"PATH", "VISIONYARD_JOB_FILE", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES"}
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU job sees no GPU
    assert trainer.stopped  # the group is always swept


async def test_a_redelivery_resumes_from_the_stored_last_checkpoint(tmp_path: Path) -> None:
    stager = FakeStager()
    attempts, sink, _ = attempts_with(tmp_path, stager=stager)
    await attempts.run(command(), delivered=2, final_delivery=False)
    started = sink.items[0]
    assert stager.checkpoint_requests == ["last"]
    assert isinstance(started, JobStarted) and started.resumed_from_epoch == 4 and started.attempt == 2


async def test_a_cancel_recorded_before_the_claim_skips_the_job(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path, ledger=FakeLedger(cancelled=1))
    assert await attempts.run(command(), delivered=1, final_delivery=False) is AttemptOutcome.FINISHED
    assert [type(i) for i in sink.items] == [JobCancelled] and launcher.specs == []


async def test_staging_outage_naks_until_the_last_delivery_then_fails_as_infrastructure(tmp_path: Path) -> None:
    attempts, sink, _ = attempts_with(tmp_path, stager=FakeStager(error=TransientError("storage away")))
    with pytest.raises(TransientError):
        await attempts.run(command(), delivered=1, final_delivery=False)
    assert sink.items == []
    assert await attempts.run(command(), delivered=5, final_delivery=True) is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.INFRASTRUCTURE


async def test_an_unknown_model_fails_as_a_user_error(tmp_path: Path) -> None:
    attempts, sink, launcher = attempts_with(tmp_path)
    cmd = command(config=TrainingConfig(framework="pytorch", model_name="nope", task_type="x", dataset_id="ds"))
    await attempts.run(cmd, delivered=1, final_delivery=False)
    assert isinstance(sink.items[-1], JobFailed) and sink.items[-1].reason is FailureReason.USER_ERROR
    assert launcher.specs == []


async def test_shutdown_hands_the_job_back_without_a_terminal_event(tmp_path: Path) -> None:
    class Forever(FakeTrainer):
        async def wait(self) -> int:
            await asyncio.Event().wait()
            return 0

    attempts, sink, _ = attempts_with(tmp_path, trainer=Forever([], 143))
    task = asyncio.create_task(attempts.run(command(), delivered=1, final_delivery=False))
    while not sink.items:
        await asyncio.sleep(0.01)
    attempts.held.stop_all(StopReason.SHUTDOWN)
    assert await task is AttemptOutcome.REQUEUE
    assert [type(i) for i in sink.items] == [JobStarted]


# -- a training attempt with checkpoint cadence --------------------------------------------------


async def test_held_checkpoints_get_their_seq_when_staged_and_the_newest_is_staged_at_exit(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []
    for epoch in (1, 2, 3):
        path = tmp_path / "jobs" / "job-1" / "1" / "outbox" / f"{epoch}-last.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"w")
        lines += [("sdk", sdk(type="progress", epoch=epoch, total_epochs=3)),
                  ("sdk", sdk(type="checkpoint", kind="last", path=str(path), epoch=epoch))]
    trainer = FakeTrainer(lines, 0)
    attempts, sink, _ = attempts_with(tmp_path, trainer=trainer)
    config = command().config.model_copy(update={"advanced_config": {"checkpoint_interval_seconds": 3600}})
    await attempts.run(command(config=config), delivered=1, final_delivery=False)
    kinds = [type(item).__name__ for item in sink.items]
    assert kinds == ["JobStarted", "ProgressReported", "CheckpointDeclared", "ProgressReported",
                     "ProgressReported", "CheckpointDeclared", "JobCompleted"]
    checkpoints = [item for item in sink.items if isinstance(item, CheckpointDeclared)]
    assert [c.epoch for c in checkpoints] == [1, 3]
    seqs = [item.seq for item in sink.items]  # type: ignore[attr-defined]
    assert seqs == sorted(seqs) == list(range(1, len(seqs) + 1))
    completed = sink.items[-1]
    assert isinstance(completed, JobCompleted) and completed.declared_checkpoints == ["last"]


def test_captured_lines_keep_the_level_they_name_and_stderr_defaults_to_error() -> None:
    events = AttemptEvents(job_id="j", attempt=1)
    info = events.from_output("stderr", "2026-12-02 06:29:55,107 - __main__ - INFO - Advanced config parameters: []")
    warning = events.from_output("stderr", "[WARNING] slow disk")
    plain = events.from_output("stderr", "Traceback (most recent call last):")
    out = events.from_output("stdout", "epoch 1 done")
    assert [e.level for e in (info, warning, plain, out)] == ["INFO", "WARNING", "ERROR", "INFO"]
    assert list(events.stderr_tail)[-1] == "Traceback (most recent call last):"  # every stderr line is kept for failures


# -- limits and fencing: a silent trainer, per-job limits, never re-running a finished job -------------


def command_with(**advanced: object) -> StartTraining:
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


class SilentLauncher:
    def __init__(self, trainer: SilentTrainer) -> None:
        self.trainer = trainer
        self.specs: list[LaunchSpec] = []

    async def launch(self, spec: LaunchSpec) -> SilentTrainer:
        self.specs.append(spec)
        return self.trainer


class NoCheckpointStager:
    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        return Path("/data")

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        return None


class TerminalRecord:
    def __init__(self, attempt: int | None = None) -> None:
        self.attempt = attempt

    async def cancelled_attempt(self, job_id: str) -> int | None:
        return None

    async def terminal_attempt(self, job_id: str) -> int | None:
        return self.attempt


def silent_attempts(tmp_path: Path, *, stall: float = 0.0, terminal: int | None = None) -> tuple[TrainingAttempts, ListSink, SilentLauncher]:
    sink, launcher = ListSink(), SilentLauncher(SilentTrainer())
    attempts = TrainingAttempts(
        options=RunnerOptions(runner_id="r", work_dir=tmp_path, trainer_python="/py", base_env={},
                              cancel_grace_seconds=0.5, stall_seconds=stall),
        manifests=[MANIFEST], stager=NoCheckpointStager(), launcher=launcher, ledger=TerminalRecord(), new_sink=lambda: sink,
        terminal=TerminalRecord(terminal),
    )
    return attempts, sink, launcher


async def test_a_silent_trainer_is_stopped_and_the_job_fails_as_stalled(tmp_path: Path) -> None:
    attempts, sink, launcher = silent_attempts(tmp_path, stall=0.3)
    outcome = await asyncio.wait_for(attempts.run(command_with(), delivered=1, final_delivery=False), timeout=10)
    assert outcome is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.STALLED
    assert launcher.trainer.stopped_with[0] == 0.5  # SIGTERM with the grace period first


async def test_the_job_config_sets_its_own_stall_limit(tmp_path: Path) -> None:
    attempts, sink, _ = silent_attempts(tmp_path, stall=0)  # the runner default would never stop it
    await asyncio.wait_for(attempts.run(command_with(stall_seconds=0.3), delivered=1, final_delivery=False), timeout=10)
    assert isinstance(sink.items[-1], JobFailed) and sink.items[-1].reason is FailureReason.STALLED


async def test_a_wall_clock_limit_from_the_job_config_fails_it_as_timeout(tmp_path: Path) -> None:
    attempts, sink, _ = silent_attempts(tmp_path)
    await asyncio.wait_for(attempts.run(command_with(timeout_seconds=0.3), delivered=1, final_delivery=False), timeout=10)
    assert isinstance(sink.items[-1], JobFailed) and sink.items[-1].reason is FailureReason.TIMEOUT


async def test_a_redelivered_command_of_a_finished_job_is_acked_without_running(tmp_path: Path) -> None:
    attempts, sink, launcher = silent_attempts(tmp_path, terminal=1)
    assert await attempts.run(command_with(), delivered=2, final_delivery=False) is AttemptOutcome.FINISHED
    assert sink.items == [] and launcher.specs == []


async def test_a_restart_after_a_finished_attempt_runs(tmp_path: Path) -> None:
    attempts, sink, launcher = silent_attempts(tmp_path, terminal=1, stall=0.2)
    cmd = command_with().model_copy(update={"attempt": 2})
    await asyncio.wait_for(attempts.run(cmd, delivered=1, final_delivery=False), timeout=10)
    assert launcher.specs and isinstance(sink.items[0], JobStarted)


def test_job_limits_ignore_unreadable_values() -> None:
    assert job_limit(command_with(stall_seconds="soon"), "stall_seconds", default=7.0) == 7.0
    assert job_limit(command_with(stall_seconds=-1), "stall_seconds", default=7.0) == 7.0
    assert job_limit(command_with(stall_seconds=12), "stall_seconds", default=7.0) == 12.0


async def test_the_last_delivery_after_lost_runners_fails_the_attempt_instead_of_running(tmp_path: Path) -> None:
    attempts, sink, launcher = silent_attempts(tmp_path)
    assert await attempts.run(command_with(), delivered=5, final_delivery=True) is AttemptOutcome.FINISHED
    failed = sink.items[-1]
    assert isinstance(failed, JobFailed) and failed.reason is FailureReason.INFRASTRUCTURE and failed.retryable
    assert launcher.specs == []  # no trainer was started that nobody could take over again
