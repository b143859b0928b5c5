"""`visionyard demo`: the whole platform on one machine, end to end, on a real image dataset.

Starts an EmbeddedStack on free ports, builds the digits ImageFolder zip, uploads it through REST,
trains a small CNN while showing progress from the WebSocket, then prints the stored checkpoints and
the MLflow run, exports the model to ONNX and classifies held-out digits with the exported package. The stack is always stopped, whatever happens.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from visionyard.cli.client import ApiClient, ApiError, ApiUnreachable, websocket_url
from visionyard.cli.dataset_upload import describe_dataset, upload_dataset
from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.cli.export_inference_demo import export_and_classify
from visionyard.cli.stack import EmbeddedStack, StackError
from visionyard.cli.training import create_and_start_job, training_config, wait_for_job
from visionyard.cli.watch import WatchOutcome, watch_job
from visionyard.shared.natsserver import free_port
from visionyard.shared.tasks import cancel_all

JOB_TIMEOUT = 600.0


class ServiceDied(RuntimeError):
    """A service of the stack exited while the demo was using it."""


async def watch_while_stack_alive(stack: EmbeddedStack, job_id: str, *, out: TextIO,
                                  timeout: float) -> WatchOutcome:
    """Watch the job, but stop waiting (ServiceDied) as soon as any service of the stack exits."""

    async def guard() -> None:
        while True:
            dead = stack.dead_services()
            if dead:
                raise ServiceDied(stack.describe_exit(dead[0]))
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch_job(websocket_url(stack.api_url), job_id, out=out))
    guardian = asyncio.create_task(guard())
    try:
        done, _ = await asyncio.wait({watcher, guardian}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f}s")
        return await next(iter(done))  # type: ignore[no-any-return]
    finally:
        await cancel_all([watcher, guardian])


def run_demo(*, data_dir: Path | None = None, epochs: int = 5, keep: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when the job completed with its checkpoints stored, 1 otherwise."""
    started = time.monotonic()
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="visionyard-demo-")) if data_dir is None else Path(data_dir)

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    stack = EmbeddedStack(data_dir=root, api_port=free_port(), echo=lambda line: say(f"  {line}"))
    try:
        say(f"Visionyard demo: data directory {stack.data_dir}")
        stack.start()
        say(f"stack ready: API {stack.api_url}  docs {stack.docs_url}  MLflow {stack.tracking_uri}")
        summary = build_digits_imagefolder(stack.data_dir / "digits.zip", stack.data_dir / "heldout")
        say(f"built digits ImageFolder: {summary.split_counts['train']} train / {summary.split_counts['val']} val "
            f"images in {summary.zip_path}; {summary.split_counts['test']} held-out test images in "
            f"{summary.heldout_dir}")
        with ApiClient(stack.api_url) as client:
            upload = upload_dataset(client, summary.zip_path, name="digits", description="scikit-learn digits 8x8")
            if not upload.ready:
                say(f"dataset rejected: {upload.reason}")
                return 1
            say(describe_dataset(upload.dataset))
            config = training_config(dataset_id=upload.dataset_id, epochs=epochs, batch_size=32, learning_rate=0.001)
            job = create_and_start_job(client, config, experiment_name="visionyard-demo")
            job_id = str(job["id"])
            say(f"training job {job_id}: pytorch / simple_cnn / image_classification, {epochs} epochs")
            outcome = asyncio.run(watch_while_stack_alive(stack, job_id, out=out, timeout=JOB_TIMEOUT))
            remaining = max(JOB_TIMEOUT - (time.monotonic() - started), 30.0)
            # The socket can announce completion before every checkpoint is stored; the job row is the truth.
            job = wait_for_job(client, job_id, timeout=remaining)
            _print_results(say, client, job, outcome)
            succeeded = job.get("status") == "completed"
            if succeeded:
                succeeded = export_and_classify(client, job_id, data_dir=stack.data_dir,
                                                heldout_dir=summary.heldout_dir, say=say)
        say(f"total wall time: {time.monotonic() - started:.1f}s")
        return 0 if succeeded else 1
    except (StackError, ApiError, ApiUnreachable, ServiceDied, TimeoutError, ConnectionError) as error:
        say(f"demo failed: {error}")
        say(f"service logs: {stack.logs_dir}")
        return 1
    finally:
        stack.stop()
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"kept data directory {root}")


def _print_results(say: Any, client: ApiClient, job: dict[str, Any], outcome: WatchOutcome) -> None:
    job_id = str(job["id"])
    say(f"job {job_id} is {job.get('status')}"
        + (f": {job.get('error_message')}" if job.get("error_message") else ""))
    if job.get("status") != "completed":
        return
    say(f"final validation accuracy: {job.get('final_accuracy')}")
    say("checkpoints:")
    for checkpoint in client.get_checkpoints(job_id):
        say(f"  {checkpoint.get('kind'):<5} {checkpoint.get('uri')}  sha256={checkpoint.get('sha256')}  "
            f"size={checkpoint.get('size_bytes')} bytes  epoch={checkpoint.get('epoch')}")
    summary = client.get_mlflow_summary(job_id)
    if summary.get("found"):
        say(f"MLflow run {summary.get('run_id')} ({summary.get('status')})")
        best = summary.get("best_metrics") or {}
        if best:
            say("  best metrics: " + ", ".join(f"{key}={value}" for key, value in sorted(best.items())))
    else:
        say(f"MLflow run not found for job {job_id} (run id from the job row: {job.get('mlflow_run_id')})")
    if outcome.reconnects:
        say(f"(the progress stream reconnected {outcome.reconnects} time(s) without losing a message)")
