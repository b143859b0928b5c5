"""The runner's use cases: run one training attempt and turn what the trainer says into job events.

No framework imports here: staging, spawning, publishing and the KV ledgers are ports (`ports.py`)
that `main.py` fills with NATS/subprocess adapters and the tests fill with fakes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from visionyard.runner.cadence import CheckpointCadence, CheckpointReported
from visionyard.runner.original import USER_ERROR_TYPES, original_command
from visionyard.runner.ports import (
    CancellationLedger,
    CheckpointDeclared,
    EventSink,
    LaunchSpec,
    Outgoing,
    StagedCheckpoint,
    Stager,
    TerminalLedger,
    TrainerHandle,
    TrainerLauncher,
)
from visionyard.shared.bus.errors import PermanentError
from visionyard.shared.commands import StartTraining
from visionyard.shared.devices import DeviceRequest, assigned_device
from visionyard.shared.events import (
    FailureReason,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobStarted,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.logs import bind
from visionyard.shared.manifest import TrainerManifest
from visionyard.shared.sdk import TrainerJob

log = logging.getLogger("visionyard.runner")

EXIT_USER_ERROR = 2
STDERR_TAIL_LINES = 20


# -- what the trainer said → events -------------------------------------------------------------


class StopReason(StrEnum):
    """Why the runner stopped a trainer before it exited by itself."""

    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    BROKER_LOST = "broker_lost"
    TIMEOUT = "timeout"
    STALLED = "stalled"


@dataclass(frozen=True)
class TrainerExit:
    """How a trainer process ended."""

    returncode: int | None
    stopped_by: StopReason | None = None
    stderr_tail: tuple[str, ...] = ()


class AttemptEvents:
    """Stamps every event of one attempt with job_id, attempt and a seq that is monotonic from 1."""

    def __init__(self, *, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self._seq = 0
        self._reported = 0
        self.declared_checkpoints: list[str] = []
        self.result: dict[str, Any] | None = None
        self.failure: dict[str, Any] | None = None
        self.last_progress: ProgressReported | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def _next(self) -> dict[str, Any]:
        self._seq += 1
        return {"job_id": self.job_id, "attempt": self.attempt, "seq": self._seq}

    def started(
        self, cmd: StartTraining, *, runner_id: str, pid: int | None, resumed_from_epoch: int | None
    ) -> JobStarted:
        """The first event of an attempt."""
        config = cmd.config
        params: dict[str, Any] = config.model_dump(mode="json", exclude_none=True)
        return JobStarted(
            **self._next(),
            runner_id=runner_id,
            pid=pid,
            dataset_hash=cmd.dataset.content_hash,
            params=params,
            experiment_name=cmd.experiment_name,
            project_id=cmd.project_id,
            resumed_from_epoch=resumed_from_epoch,
        )

    def from_sdk_line(self, line: str) -> Outgoing | CheckpointReported | None:
        """Translate one SDK JSON line; `result` is kept for the terminal event and yields nothing.

        A checkpoint comes back as `CheckpointReported` without a seq: `checkpoint()` stamps it when
        the cadence passes it on.
        """
        text = line.strip()
        if not text:
            return None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            kind = record.get("type")
            if kind == "progress":
                event = ProgressReported(
                    **self._peek(),
                    epoch=int(record["epoch"]),
                    total_epochs=int(record["total_epochs"]),
                    step=record.get("step"),
                    metrics={k: float(v) for k, v in (record.get("metrics") or {}).items()},
                )
                self._next()
                self.last_progress = event
                return event
            if kind == "log":
                event_log = LogEmitted(
                    **self._peek(),
                    level=str(record.get("level") or "INFO").upper(),
                    event_type=str(record.get("event_type") or "log"),
                    message=str(record.get("message", "")),
                    data=record.get("data") if isinstance(record.get("data"), dict) else None,
                )
                self._next()
                return event_log
            if kind == "checkpoint":
                checkpoint_kind = str(record["kind"])
                path = Path(str(record["path"]))
                epoch = record.get("epoch")
                reported = CheckpointReported(
                    kind=checkpoint_kind, path=path, epoch=int(epoch) if epoch is not None else None,
                    order=self._reported,
                )
                self._reported += 1
                if checkpoint_kind not in self.declared_checkpoints:
                    self.declared_checkpoints.append(checkpoint_kind)
                return reported
            if kind == "result":
                self.result = record
                return None
            if kind == "failure":
                # The original SDK's report_failed: the job fails by it, whatever the exit code says.
                self.failure = record
                return None
            raise ValueError(f"unknown record type {kind!r}")
        except (ValueError, KeyError, TypeError) as error:
            # A malformed line is the trainer's bug, not a reason to lose the job: show it as a warning.
            return LogEmitted(
                **self._next(),
                level="WARNING",
                event_type="sdk_error",
                message=f"unreadable SDK line ({error}): {text[:500]}",
            )

    def checkpoint(self, reported: CheckpointReported) -> CheckpointDeclared:
        """A reported checkpoint, stamped with the next seq: the publisher stages it, then announces it."""
        return CheckpointDeclared(
            **self._next(), kind=reported.kind, path=reported.path, epoch=reported.epoch
        )

    def _peek(self) -> dict[str, Any]:
        # Validation happens before the seq is consumed, so a rejected line never leaves a gap.
        return {"job_id": self.job_id, "attempt": self.attempt, "seq": self._seq + 1}

    def from_output(self, stream: str, text: str) -> LogEmitted:
        """A captured stdout/stderr line."""
        line = text.rstrip("\r\n")
        if stream == "stderr":
            self.stderr_tail.append(line)
        return LogEmitted(
            **self._next(),
            level=output_level(stream, line),
            event_type=stream,
            message=line,
        )

    def cancelled(self) -> JobCancelled:
        """The attempt was cancelled."""
        return JobCancelled(**self._next())

    def failed(self, reason: FailureReason, message: str, **details: Any) -> JobFailed:
        """The attempt failed for `reason`."""
        return JobFailed(**self._next(), reason=reason, error_message=message, **details)

    def terminal(self, outcome: TrainerExit) -> JobEvent | None:
        """The terminal event for how the trainer ended; None when the job must go to another runner."""
        if outcome.stopped_by in (StopReason.SHUTDOWN, StopReason.BROKER_LOST):
            return None
        if outcome.stopped_by is StopReason.CANCEL:
            return self.cancelled()
        tail = "\n".join(outcome.stderr_tail or self.stderr_tail)
        if outcome.stopped_by is StopReason.TIMEOUT:
            return self.failed(FailureReason.TIMEOUT, "the job ran past its time limit and was stopped",
                               exit_code=outcome.returncode)
        if outcome.stopped_by is StopReason.STALLED:
            return self.failed(FailureReason.STALLED, "the trainer reported nothing for too long and was stopped",
                               exit_code=outcome.returncode)
        code = outcome.returncode
        if self.failure is not None:
            return self._reported_failure(code, tail)
        if code == 0:
            return self._completed()
        if code == EXIT_USER_ERROR:
            message = _last_meaningful(outcome.stderr_tail or tuple(self.stderr_tail)) or "the trainer rejected the job"
            return self.failed(FailureReason.USER_ERROR, message, exit_code=code, traceback=tail or None)
        return self.failed(
            FailureReason.TRAINER_CRASH,
            _describe_exit(code, outcome.stderr_tail or tuple(self.stderr_tail)),
            exit_code=code,
            traceback=tail or None,
        )

    def _reported_failure(self, code: int | None, tail: str) -> JobFailed:
        failure = self.failure or {}
        error_type = str(failure.get("error_type") or "UnknownError")
        reason = FailureReason.USER_ERROR if error_type in USER_ERROR_TYPES else FailureReason.TRAINER_CRASH
        traceback = failure.get("traceback")
        return self.failed(
            reason,
            f"[{error_type}] {failure.get('message') or 'the trainer reported a failure'}",
            exit_code=code,
            traceback=str(traceback) if traceback else (tail or None),
        )

    def _completed(self) -> JobCompleted:
        result = self.result or {}
        final = result.get("final_metrics") or (self.last_progress.metrics if self.last_progress else {})
        epochs = result.get("epochs_completed")
        if epochs is None:
            epochs = self.last_progress.epoch if self.last_progress else 0
        return JobCompleted(
            **self._next(),
            total_epochs_completed=int(epochs),
            final_metrics={k: float(v) for k, v in final.items()},
            best_metrics={k: float(v) for k, v in (result.get("best_metrics") or {}).items()},
            best_epoch=result.get("best_epoch"),
            declared_checkpoints=list(self.declared_checkpoints),
        )


# A logging-style level near the start of a line: `2026-12-02 06:29:55,107 - __main__ - INFO - ...`,
# `INFO:root:...`, `[WARNING] ...`. Python's logging writes every level to stderr by default.
_LINE_LEVEL = re.compile(r"(?:^|[\s\[|:-])(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)(?=[\]\s|:-]|$)")


def output_level(stream: str, line: str) -> str:
    """The level of a captured output line: the level it names itself, else INFO (stdout) or ERROR (stderr)."""
    named = _LINE_LEVEL.search(line[:80])
    if named:
        level = named.group(1)
        return "WARNING" if level == "WARN" else level
    return "ERROR" if stream == "stderr" else "INFO"


def _last_meaningful(lines: Iterable[str]) -> str:
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return ""


def _describe_exit(code: int | None, tail: Iterable[str]) -> str:
    if code is None:
        return "the trainer ended without an exit status"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        reason = f"the trainer was killed by signal {name}"
        if name == "SIGKILL":
            reason += " (out of memory?)"
        return reason
    last = _last_meaningful(tail)
    return f"the trainer exited with code {code}" + (f": {last}" if last else "")


# -- holding jobs -------------------------------------------------------------------------------


@dataclass
class RunControl:
    """Stop requests for one held delivery of a job; the first reason wins."""

    job_id: str
    command_attempt: int
    # Which delivery of the command this is (1 for the first): a stop for a lost delivery reaches it alone.
    delivered: int = 1
    reason: StopReason | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def request_stop(self, reason: StopReason) -> None:
        """Ask the attempt to stop its trainer."""
        if self.reason is None:
            self.reason = reason
            self._event.set()

    async def wait(self) -> StopReason:
        """Until a stop is requested."""
        await self._event.wait()
        assert self.reason is not None
        return self.reason


class HeldJobs:
    """The jobs this runner holds right now, so cancel requests and shutdown can reach them.

    A job is normally held once. It is held twice only when JetStream redelivered its command while an
    earlier delivery was still winding down here (this runner lost the broker for longer than the ack
    wait, then got the command back): the newer delivery is the live one, so holding it stops the older.
    Every delivery stays reachable until released, and once `stop_all` ran (shutdown) a delivery held
    after it is stopped at once: a command claimed as the runner stopped must not run to its end.
    """

    def __init__(self) -> None:
        self._controls: dict[str, list[RunControl]] = {}
        self._stopped: StopReason | None = None

    def hold(self, cmd: StartTraining, *, delivered: int = 1) -> RunControl:
        """Register a claimed command (before checking the ledger, so no cancel falls in between)."""
        control = RunControl(job_id=cmd.job_id, command_attempt=cmd.attempt, delivered=delivered)
        held = self._controls.setdefault(cmd.job_id, [])
        for older in held:
            if older.command_attempt + older.delivered < cmd.attempt + delivered:
                log.warning("job redelivered while an earlier delivery was still held here: stopping that one",
                            extra={"job_id": cmd.job_id, "delivery": older.delivered, "redelivery": delivered})
                older.request_stop(StopReason.BROKER_LOST)
        held.append(control)
        if self._stopped is not None:
            control.request_stop(self._stopped)
        return control

    def release(self, control: RunControl) -> None:
        """Forget a delivery once its attempt is over."""
        held = self._controls.get(control.job_id, [])
        if any(entry is control for entry in held):
            held[:] = [entry for entry in held if entry is not control]
            if not held:
                del self._controls[control.job_id]

    def request_cancel(self, job_id: str, attempt: int) -> bool:
        """Cancel a held job if the cancel is for this attempt or a newer one (older cancels are fenced)."""
        reached = [control for control in self._controls.get(job_id, []) if attempt >= control.command_attempt]
        for control in reached:
            control.request_stop(StopReason.CANCEL)
        return bool(reached)

    def request_stop(self, job_id: str, reason: StopReason, *, delivered: int | None = None) -> None:
        """Stop one held job (only its delivery `delivered`, when given), if held."""
        for control in self._controls.get(job_id, []):
            if delivered is None or control.delivered == delivered:
                control.request_stop(reason)

    def stop_all(self, reason: StopReason) -> None:
        """Stop every held job, and every job held from now on (runner shutdown)."""
        self._stopped = reason
        for held in list(self._controls.values()):
            for control in held:
                control.request_stop(reason)

    def __len__(self) -> int:
        return sum(len(held) for held in self._controls.values())


class AttemptOutcome(StrEnum):
    """What the consumer does with the command afterwards."""

    FINISHED = "finished"  # a terminal event is acknowledged: ack the command
    REQUEUE = "requeue"  # no terminal event: nak so another runner resumes the job
    # No terminal event, and the delivery is no longer this runner's (the broker was lost, or the command was
    # redelivered meanwhile): settle nothing, JetStream redelivers it (`HeldMessage.leave`).
    LEFT = "left"


def handed_back(reason: StopReason | None) -> AttemptOutcome:
    """The outcome of an attempt stopped for `reason` without a terminal event."""
    return AttemptOutcome.LEFT if reason is StopReason.BROKER_LOST else AttemptOutcome.REQUEUE


def effective_attempt(cmd: StartTraining, *, delivered: int) -> int:
    """Each redelivery (failover) is a new attempt: the command's attempt plus earlier deliveries."""
    return cmd.attempt + max(delivered, 1) - 1


def find_manifest(manifests: Iterable[TrainerManifest], *, framework: str, model_name: str) -> TrainerManifest | None:
    """The installed trainer that trains `model_name` with `framework`."""
    for manifest in manifests:
        if manifest.framework == framework and model_name in manifest.model_names():
            return manifest
    return None


@dataclass(frozen=True)
class RunnerOptions:
    """Static settings the use case needs."""

    runner_id: str
    work_dir: Path
    trainer_python: str
    base_env: dict[str, str]
    cancel_grace_seconds: float
    stall_seconds: float = 0.0
    # At most one checkpoint of each kind staged per this many seconds, the newest (cadence.py); 0: all.
    checkpoint_interval_seconds: float = 0.0
    # Manifest name → the interpreter of its environment (runner/trainers.py); others use trainer_python.
    interpreters: dict[str, str] = field(default_factory=dict)

    def python_for(self, manifest: TrainerManifest) -> str:
        """The interpreter that runs `manifest`'s trainer, export and predict modules."""
        return self.interpreters.get(manifest.name, self.trainer_python)


class TrainingAttempts:
    """Runs training attempts: stage, spawn, translate, stop, classify, publish."""

    def __init__(
        self,
        *,
        options: RunnerOptions,
        manifests: list[TrainerManifest],
        stager: Stager,
        launcher: TrainerLauncher,
        ledger: CancellationLedger,
        new_sink: Callable[[], EventSink],
        held: HeldJobs | None = None,
        terminal: TerminalLedger | None = None,
    ) -> None:
        self.options = options
        self.manifests = manifests
        self.stager = stager
        self.launcher = launcher
        self.ledger = ledger
        self.new_sink = new_sink
        self.held = held or HeldJobs()
        self.terminal = terminal

    async def run(
        self, cmd: StartTraining, *, delivered: int, final_delivery: bool, gpus: list[str] | None = None
    ) -> AttemptOutcome:
        """Run one delivery of `cmd` to its end on `gpus` (none: cpu); a raised error means nak with backoff."""
        control = self.held.hold(cmd, delivered=delivered)
        try:
            return await self._run_held(cmd, control=control, delivered=delivered, final_delivery=final_delivery,
                                        gpus=list(gpus or []))
        finally:
            self.held.release(control)

    async def _run_held(
        self, cmd: StartTraining, *, control: RunControl, delivered: int, final_delivery: bool, gpus: list[str]
    ) -> AttemptOutcome:
        attempt = effective_attempt(cmd, delivered=delivered)
        logger = bind(log, job_id=cmd.job_id, attempt=attempt, delivery=delivered)
        events = AttemptEvents(job_id=cmd.job_id, attempt=attempt)
        sink: EventSink = self.new_sink()
        try:
            finished = await self.terminal.terminal_attempt(cmd.job_id) if self.terminal is not None else None
            if finished is not None and finished >= cmd.attempt:
                # A redelivered command of a job the API already shows finished (its runner died before
                # acking): running it again would reopen a completed job, so it is only acknowledged.
                logger.info("job already finished at attempt %s; acknowledging the command", finished)
                return AttemptOutcome.FINISHED
            cancelled = await self.ledger.cancelled_attempt(cmd.job_id)
            if (cancelled is not None and cancelled >= cmd.attempt) or control.reason is StopReason.CANCEL:
                # The API already shows it cancelled; the event closes it for a runner that died holding it.
                logger.info("job was cancelled before it started; skipping")
                return await self._finish(sink, events.cancelled())
            if final_delivery and delivered > 1:
                # Every earlier delivery lost its runner. Were this one lost too, no delivery would be
                # left and the job would show `running` for ever; so the last delivery closes the attempt
                # as an infrastructure loss and the API decides whether a new attempt remains.
                return await self._finish(sink, events.failed(
                    FailureReason.INFRASTRUCTURE,
                    f"the job lost its runner {delivered - 1} times; giving up on this attempt",
                    retryable=True,
                ))
            manifest = find_manifest(self.manifests, framework=cmd.config.framework, model_name=cmd.config.model_name)
            if manifest is None:
                return await self._finish(sink, events.failed(
                    FailureReason.USER_ERROR,
                    f"no installed trainer offers model {cmd.config.model_name!r} for framework {cmd.config.framework!r}",
                ))
            job_dir = self.options.work_dir / "jobs" / cmd.job_id / str(attempt)
            try:
                dataset_dir = await self.stager.stage_dataset(cmd.dataset)
                resume = None
                if delivered > 1 or cmd.resume_from is not None:
                    resume = await self.stager.stage_checkpoint(cmd.job_id, "last", job_dir / "resume")
            except PermanentError as error:
                return await self._finish(sink, events.failed(
                    FailureReason.INFRASTRUCTURE, f"could not stage the job's inputs: {error}"
                ))
            except Exception as error:
                if final_delivery:
                    return await self._finish(sink, events.failed(
                        FailureReason.INFRASTRUCTURE, f"could not stage the job's inputs: {error}", retryable=True
                    ))
                raise
            if control.reason is not None:
                return await self._finish_stopped(sink, events, control.reason)
            outcome = await self._train(
                cmd, manifest=manifest, control=control, events=events, sink=sink, job_dir=job_dir,
                dataset_dir=dataset_dir, resume=resume, logger=logger, gpus=gpus,
            )
            if outcome is AttemptOutcome.FINISHED:
                shutil.rmtree(job_dir, ignore_errors=True)
            return outcome
        finally:
            await sink.close()

    async def _finish(self, sink: EventSink, event: JobEvent) -> AttemptOutcome:
        sink.emit(event)
        # The command is acked only after the terminal event is safely stored.
        await sink.drain()
        return AttemptOutcome.FINISHED

    async def _finish_stopped(self, sink: EventSink, events: AttemptEvents, reason: StopReason) -> AttemptOutcome:
        terminal = events.terminal(TrainerExit(returncode=None, stopped_by=reason))
        if terminal is None:
            await sink.drain()
            return handed_back(reason)
        return await self._finish(sink, terminal)

    async def _train(
        self,
        cmd: StartTraining,
        *,
        manifest: TrainerManifest,
        control: RunControl,
        events: AttemptEvents,
        sink: EventSink,
        job_dir: Path,
        dataset_dir: Path,
        resume: StagedCheckpoint | None,
        logger: logging.LoggerAdapter[logging.Logger],
        gpus: list[str],
    ) -> AttemptOutcome:
        job_dir.mkdir(parents=True, exist_ok=True)
        device = assigned_device(DeviceRequest(kind="gpu", gpus=len(gpus)) if gpus else DeviceRequest())
        # The trainer is told the device to use (`cpu`, or indices within its CUDA_VISIBLE_DEVICES).
        config = cmd.config.model_copy(update={"advanced_config": {**(cmd.config.advanced_config or {}), "device": device}})
        job = TrainerJob(
            job_id=cmd.job_id,
            attempt=events.attempt,
            config=config,
            dataset_dir=dataset_dir,
            output_dir=job_dir / "output",
            outbox_dir=job_dir / "outbox",
            resume_checkpoint=resume.path if resume else None,
            resume_epoch=resume.epoch if resume else None,
            split=cmd.dataset.split,
        )
        job_file = job_dir / "job.json"
        job_file.write_text(job.model_dump_json(indent=2))
        if manifest.entrypoint is not None and manifest.directory is not None:
            argv, cwd, env = original_command(
                manifest, cmd, python=self.options.python_for(manifest), job_file=job_file, job_dir=job_dir,
                base_env=self.options.base_env, device=device,
            )
        else:
            argv, cwd = [self.options.python_for(manifest), "-m", str(manifest.module)], job_dir
            env = {**self.options.base_env, "VISIONYARD_JOB_FILE": str(job_file), "PYTHONUNBUFFERED": "1"}
        # Each job sees only the GPUs it holds; a CPU job sees none.
        spec = LaunchSpec(argv=argv, cwd=cwd, env={**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)})
        handle = await self.launcher.launch(spec)
        logger.info("trainer started", extra={"pid": handle.pid})
        sink.emit(events.started(
            cmd, runner_id=self.options.runner_id, pid=handle.pid,
            resumed_from_epoch=resume.epoch if resume else None,
        ))
        activity = TrainerActivity()
        cadence = CheckpointCadence(
            lambda reported: sink.emit(events.checkpoint(reported)),
            interval=job_limit(cmd, "checkpoint_interval_seconds", default=self.options.checkpoint_interval_seconds),
            outbox=job.outbox_dir,
        )
        try:
            pump = asyncio.create_task(self._pump(handle, events, sink, cadence, activity=activity))
            exited = asyncio.create_task(handle.wait())
            stop_requested = asyncio.create_task(control.wait())
            stall_seconds = job_limit(cmd, "stall_seconds", default=self.options.stall_seconds)
            watchdog = asyncio.create_task(watch_for_stall(activity, control, stall_seconds=stall_seconds))
            stopped_by: StopReason | None = None
            try:
                done, _ = await asyncio.wait(
                    {exited, stop_requested},
                    timeout=cmd.timeout_seconds or job_limit(cmd, "timeout_seconds", default=0.0) or None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if exited in done:
                    returncode = exited.result()
                else:
                    stopped_by = control.reason if stop_requested in done else StopReason.TIMEOUT
                    logger.info("stopping trainer", extra={"reason": str(stopped_by)})
                    returncode = await handle.stop(grace=self.options.cancel_grace_seconds)
            finally:
                stop_requested.cancel()
                watchdog.cancel()
                # Whatever happened, no process of the job's group may outlive the attempt.
                final_code = await handle.stop(grace=0)
            if not exited.done():
                exited.cancel()
            returncode = returncode if returncode is not None else final_code
            await pump
            cadence.flush()  # however the trainer ended, its newest checkpoints are staged before the terminal event
            if cadence.superseded:
                logger.info("checkpoints superseded before staging", extra={"superseded": cadence.superseded})
            logger.info("trainer exited", extra={"returncode": returncode})
            terminal = events.terminal(TrainerExit(returncode=returncode, stopped_by=stopped_by))
            if terminal is None:
                # Publish what the trainer saved on the way out (its last checkpoint), then hand the job back.
                await sink.drain()
                return handed_back(stopped_by)
            return await self._finish(sink, terminal)
        finally:
            cadence.close()  # an attempt that ends in an error leaves no timer to stage into a closed sink

    async def _pump(
        self,
        handle: TrainerHandle,
        events: AttemptEvents,
        sink: EventSink,
        cadence: CheckpointCadence,
        *,
        activity: TrainerActivity,
    ) -> None:
        async for stream, text in handle.lines():
            activity.touch()
            item = events.from_sdk_line(text) if stream == "sdk" else events.from_output(stream, text)
            if isinstance(item, CheckpointReported):
                cadence.offer(item)
            elif item is not None:
                sink.emit(item)


# -- limits: wall-clock timeout and stall detection ---------------------------------------------------


class TrainerActivity:
    """When the trainer last said anything (an SDK record or an output line)."""

    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def touch(self) -> None:
        """Record that the trainer just spoke."""
        self.last = asyncio.get_running_loop().time()

    def silent_for(self) -> float:
        """Seconds since the trainer last spoke."""
        return asyncio.get_running_loop().time() - self.last


def job_limit(cmd: StartTraining, key: str, *, default: float) -> float:
    """A per-job limit from `advanced_config[key]` (seconds), else `default`; unreadable values are ignored."""
    raw = (cmd.config.advanced_config or {}).get(key)
    try:
        value = float(raw) if raw is not None else default
    except (TypeError, ValueError):
        return default
    return value if value >= 0 else default


async def watch_for_stall(activity: TrainerActivity, control: RunControl, *, stall_seconds: float) -> None:
    """Stop the attempt as stalled once the trainer has been silent for `stall_seconds` (0: never)."""
    if stall_seconds <= 0:
        return
    while True:
        silent = activity.silent_for()
        if silent >= stall_seconds:
            control.request_stop(StopReason.STALLED)
            return
        # Check often enough to stop within ~10% of the limit, but never spin.
        await asyncio.sleep(max(min(stall_seconds - silent, stall_seconds / 10, 5.0), 0.05))
