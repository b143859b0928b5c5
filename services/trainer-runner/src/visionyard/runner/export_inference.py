"""The runner's export and inference use cases: stage a stored checkpoint (and images), spawn the
trainer's `export_module`/`predict_module`, stage what it wrote, and publish the job's events.

They share the training attempts' launcher, staging and settings, and the consumer's slots (the
commands arrive on the same `runner` consumer). They are held in the same `HeldJobs` as training
attempts, so a cancel recorded in KV `job_cancellations` (keyed by the export/inference id) stops them
(SIGTERM to the group, grace, SIGKILL; then a `cancelled` event), and a runner shutdown or the runner
losing the broker hands them back unfinished (no terminal event: the command is nak'ed or redelivered
and a runner runs it again).
No framework imports: ports are Protocols (`ports.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from visionyard.runner.ports import (
    CancellationLedger,
    EventPublisher,
    LaunchSpec,
    ObjectStager,
    Stager,
    TrainerLauncher,
)
from visionyard.runner.service import (
    EXIT_USER_ERROR,
    AttemptOutcome,
    HeldJobs,
    RunControl,
    RunnerOptions,
    StopReason,
    _describe_exit,
    find_manifest,
    handed_back,
)
from visionyard.shared.bus.errors import PermanentError
from visionyard.shared.commands import StartExport, StartInference
from visionyard.shared.events import (
    ExportCancelled,
    ExportCompleted,
    ExportFailed,
    ExportInferenceEvent,
    ExportPackageStaged,
    ExportProgress,
    ExportStarted,
    FailureReason,
    InferenceCancelled,
    InferenceCompleted,
    InferenceFailed,
    InferenceProgress,
    InferenceResultsStaged,
    InferenceStarted,
)
from visionyard.shared.logs import bind
from visionyard.shared.manifest import TrainerManifest
from visionyard.shared.sdk import ExportJob, PredictInput, PredictJob

log = logging.getLogger("visionyard.runner.export_inference")

DEFAULT_TIMEOUT_SECONDS = 900.0


class RunStopped(Exception):
    """The runner stopped the job before it finished (cancel, shutdown, broker lost)."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"stopped: {reason}")
        self.reason = reason


class RunFailure(Exception):
    """The job cannot succeed; carries the classified reason for its `failed` event."""

    def __init__(self, reason: FailureReason, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


@dataclass
class RunStamp:
    """Stamps every event of one export/inference attempt with ids and a monotonic seq."""

    job_id: str
    attempt: int
    training_job_id: str
    seq: int = 0

    def fields(self) -> dict[str, Any]:
        """The common fields of the next event."""
        self.seq += 1
        return {"job_id": self.job_id, "attempt": self.attempt, "seq": self.seq,
                "training_job_id": self.training_job_id}


def _safe_name(uri: str, index: int) -> str:
    name = PurePosixPath(uri.split("?", 1)[0]).name or f"image-{index}"
    return f"{index:05d}-{name.replace('/', '_')}"


class ExportInferenceRuns:
    """Runs export and inference commands to their terminal event."""

    def __init__(
        self,
        *,
        options: RunnerOptions,
        manifests: list[TrainerManifest],
        stager: Stager,
        objects: ObjectStager,
        launcher: TrainerLauncher,
        publisher: EventPublisher,
        held: HeldJobs | None = None,
        ledger: CancellationLedger | None = None,
    ) -> None:
        self.options = options
        self.manifests = manifests
        self.stager = stager
        self.objects = objects
        self.launcher = launcher
        self.publisher = publisher
        # Shared with the training attempts so one cancellation watcher and one shutdown reach all jobs.
        self.held = held if held is not None else HeldJobs()  # an empty HeldJobs is falsy
        self.ledger = ledger

    async def run_export(self, cmd: StartExport, *, delivered: int) -> AttemptOutcome:
        """Export a checkpoint; publishes started … staged, completed (or failed, cancelled).

        REQUEUE (or LEFT) means the runner stopped it without a terminal event (shutdown, broker lost).
        """
        stamp = RunStamp(cmd.job_id, cmd.attempt + max(delivered, 1) - 1, cmd.training_job_id)
        job_dir = self.options.work_dir / "exports" / cmd.job_id / str(stamp.attempt)

        async def export(control: RunControl) -> None:
            manifest = self._manifest(cmd.framework, cmd.model_name, module="export_module")
            if cmd.export_format not in manifest.export_formats:
                raise RunFailure(FailureReason.USER_ERROR,
                                  f"{manifest.name} cannot export to {cmd.export_format!r}")
            checkpoint = await self._checkpoint(cmd.training_job_id, cmd.checkpoint.kind, job_dir)
            job = ExportJob(
                export_id=cmd.job_id, training_job_id=cmd.training_job_id, checkpoint=checkpoint,
                output_dir=job_dir / "output", export_format=cmd.export_format, framework=cmd.framework,
                model_name=cmd.model_name, task_type=cmd.task_type,
                export_config=cmd.export_config.model_dump(), validation_config=cmd.validation_config.model_dump(),
            )
            await self._spawn(str(manifest.export_module), job.model_dump_json(), python=self.options.python_for(manifest),
                              job_dir=job_dir, stamp=stamp,
                              started=ExportStarted, progress=ExportProgress, timeout=cmd.timeout_seconds,
                              control=control)
            if not job.package_path.is_file():
                raise RunFailure(FailureReason.TRAINER_CRASH, "the exporter exited 0 but wrote no package")
            results = json.loads(job.result_path.read_text()) if job.result_path.is_file() else {}
            object_name = f"export/{cmd.job_id}/{stamp.attempt}/package.zip"
            sha256, size = await self.publisher.put_file(object_name, job.package_path)
            await self.publisher.publish(ExportPackageStaged(**stamp.fields(), object_name=object_name,
                                                             sha256=sha256, size_bytes=size))
            await self.publisher.publish(ExportCompleted(**stamp.fields(), results=results))

        return await self._held(cmd, delivered=delivered, stamp=stamp, job_dir=job_dir, body=export,
                                failed=ExportFailed, cancelled=ExportCancelled)

    async def run_inference(self, cmd: StartInference, *, delivered: int) -> AttemptOutcome:
        """Classify the command's images; publishes started … staged results, completed (or failed, cancelled)."""
        stamp = RunStamp(cmd.job_id, cmd.attempt + max(delivered, 1) - 1, cmd.training_job_id)
        job_dir = self.options.work_dir / "inference" / cmd.job_id / str(stamp.attempt)

        async def infer(control: RunControl) -> None:
            manifest = self._manifest(cmd.framework, cmd.model_name, module="predict_module")
            checkpoint = await self._checkpoint(cmd.training_job_id, cmd.checkpoint.kind, job_dir)
            images: list[PredictInput] = []
            for index, uri in enumerate(cmd.image_uris):
                name = _safe_name(uri, index)
                path = await self.objects.stage_object(uri, job_dir / "inputs" / name)
                images.append(PredictInput(path=path, name=PurePosixPath(uri).name))
            dataset_dir = await self.stager.stage_dataset(cmd.dataset) if cmd.dataset is not None else None
            job = PredictJob(
                inference_id=cmd.job_id, training_job_id=cmd.training_job_id, checkpoint=checkpoint,
                output_dir=job_dir / "output", images=images, dataset_dir=dataset_dir, split=cmd.split,
                top_k=cmd.top_k, confidence_threshold=cmd.confidence_threshold,
            )
            await self._spawn(str(manifest.predict_module), job.model_dump_json(), python=self.options.python_for(manifest),
                              job_dir=job_dir, stamp=stamp,
                              started=InferenceStarted, progress=InferenceProgress, timeout=cmd.timeout_seconds,
                              control=control)
            if not job.results_path.is_file():
                raise RunFailure(FailureReason.TRAINER_CRASH, "the predictor exited 0 but wrote no results")
            summary = json.loads(job.results_path.read_text()).get("summary", {})
            object_name = f"results/{cmd.job_id}/{stamp.attempt}/results.json"
            sha256, size = await self.publisher.put_file(object_name, job.results_path)
            await self.publisher.publish(InferenceResultsStaged(**stamp.fields(), object_name=object_name,
                                                                sha256=sha256, size_bytes=size))
            await self.publisher.publish(InferenceCompleted(**stamp.fields(), results=summary,
                                                            results_object=object_name, results_sha256=sha256))

        return await self._held(cmd, delivered=delivered, stamp=stamp, job_dir=job_dir, body=infer,
                                failed=InferenceFailed, cancelled=InferenceCancelled)

    async def _held(
        self, cmd: StartExport | StartInference, *, delivered: int, stamp: RunStamp, job_dir: Path,
        body: Callable[[RunControl], Awaitable[None]], failed: type[ExportFailed | InferenceFailed],
        cancelled: type[ExportCancelled | InferenceCancelled],
    ) -> AttemptOutcome:
        """Run `body` as a held job: cancellable, stoppable at shutdown, ending in exactly one terminal event."""
        # HeldJobs reads only `job_id` and `attempt`; registering before reading the ledger means a
        # cancel recorded in between is seen by the watcher instead of being lost.
        control = self.held.hold(cmd, delivered=delivered)  # type: ignore[arg-type]
        try:
            recorded = await self.ledger.cancelled_attempt(cmd.job_id) if self.ledger is not None else None
            if (recorded is not None and recorded >= cmd.attempt) or control.reason is StopReason.CANCEL:
                # Cancelled while queued (or before a dead runner's redelivery): close it without running.
                await self.publisher.publish(cancelled(**stamp.fields()))
                return AttemptOutcome.FINISHED
            await body(control)
            return AttemptOutcome.FINISHED
        except RunStopped as stopped:
            if stopped.reason is StopReason.CANCEL:
                await self.publisher.publish(cancelled(**stamp.fields()))
                return AttemptOutcome.FINISHED
            return handed_back(stopped.reason)  # shutdown / broker lost: another runner takes the command
        except PermanentError as error:
            await self.publisher.publish(failed(**stamp.fields(), reason=FailureReason.USER_ERROR,
                                                error_message=str(error)))
            return AttemptOutcome.FINISHED
        except RunFailure as failure:
            await self.publisher.publish(failed(**stamp.fields(), reason=failure.reason,
                                                error_message=str(failure), exit_code=failure.exit_code))
            return AttemptOutcome.FINISHED
        finally:
            self.held.release(control)
            shutil.rmtree(job_dir, ignore_errors=True)

    def _manifest(self, framework: str, model_name: str, *, module: str) -> TrainerManifest:
        manifest = find_manifest(self.manifests, framework=framework, model_name=model_name)
        if manifest is None or not getattr(manifest, module):
            raise RunFailure(FailureReason.USER_ERROR,
                              f"no installed trainer offers {module.split('_')[0]} for {framework}/{model_name}")
        return manifest

    async def _checkpoint(self, training_job_id: str, kind: str, job_dir: Path) -> Path:
        staged = await self.stager.stage_checkpoint(training_job_id, kind, job_dir / "checkpoint")
        if staged is None:
            raise RunFailure(FailureReason.USER_ERROR,
                              f"training job {training_job_id} has no stored {kind} checkpoint")
        return staged.path

    async def _spawn(
        self, module: str, job_json: str, *, python: str, job_dir: Path, stamp: RunStamp,
        started: type[ExportStarted | InferenceStarted], progress: type[ExportProgress | InferenceProgress],
        timeout: float | None, control: RunControl,
    ) -> None:
        logger = bind(log, job_id=stamp.job_id, attempt=stamp.attempt)
        if control.reason is not None:
            raise RunStopped(control.reason)  # stopped while its inputs were being staged
        job_dir.mkdir(parents=True, exist_ok=True)
        job_file = job_dir / "job.json"
        job_file.write_text(job_json)
        spec = LaunchSpec(
            argv=[python, "-m", module], cwd=job_dir,
            # Exports and inference run on the CPU: they hold a slot, never a GPU.
            env={**self.options.base_env, "VISIONYARD_JOB_FILE": str(job_file), "PYTHONUNBUFFERED": "1",
                 "CUDA_VISIBLE_DEVICES": ""},
        )
        handle = await self.launcher.launch(spec)
        tail: deque[str] = deque(maxlen=20)

        async def pump() -> None:
            async for stream, text in handle.lines():
                if stream == "stderr":
                    tail.append(text)
                elif stream == "sdk":
                    event = self._progress_of(text, stamp=stamp, progress=progress)
                    if event is not None:
                        await self.publisher.publish(event)

        pumping: asyncio.Task[None] | None = None
        exited = asyncio.create_task(handle.wait())
        stop_requested = asyncio.create_task(control.wait())
        stopped_by: StopReason | None = None
        code: int | None = None
        try:
            await self.publisher.publish(started(**stamp.fields(), runner_id=self.options.runner_id, pid=handle.pid))
            pumping = asyncio.create_task(pump())
            done, _ = await asyncio.wait({exited, stop_requested}, timeout=timeout or DEFAULT_TIMEOUT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                code = exited.result()
            else:
                stopped_by = control.reason if stop_requested in done else StopReason.TIMEOUT
                logger.info("stopping %s", module, extra={"reason": str(stopped_by)})
                code = await handle.stop(grace=self.options.cancel_grace_seconds)
        finally:
            stop_requested.cancel()
            # Whatever happened (even a failed publish), no process of the group outlives the job.
            final_code = await handle.stop(grace=0)
            if not exited.done():
                exited.cancel()
        if pumping is not None:
            await asyncio.gather(pumping, return_exceptions=True)
        code = code if code is not None else final_code
        logger.info("%s exited", module, extra={"returncode": code})
        if stopped_by is StopReason.TIMEOUT:
            raise RunFailure(FailureReason.TIMEOUT, "the job ran past its time limit and was stopped", exit_code=code)
        if stopped_by is not None:
            raise RunStopped(stopped_by)
        if code == EXIT_USER_ERROR:
            last = next((line.strip() for line in reversed(tail) if line.strip()), "the job was rejected")
            raise RunFailure(FailureReason.USER_ERROR, last.removeprefix("error: "), exit_code=code)
        if code != 0:
            raise RunFailure(FailureReason.TRAINER_CRASH, _describe_exit(code, tail), exit_code=code)

    def _progress_of(
        self, line: str, *, stamp: RunStamp, progress: type[ExportProgress | InferenceProgress]
    ) -> ExportInferenceEvent | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        if record.get("type") == "log":
            return progress(**stamp.fields(), message=str(record.get("message", "")))
        if record.get("type") == "progress" and record.get("total_epochs"):
            done, total = int(record.get("epoch") or 0), int(record["total_epochs"])
            return progress(**stamp.fields(), message=f"{done}/{total}", percent=round(100.0 * done / total, 2))
        return None
