"""Composition root of the trainer runner: settings, bus, adapters, consumer; runs until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging

from visionyard.runner.adapters.kv import (
    KvCancellationLedger,
    KvTerminalLedger,
    publish_capabilities,
    watch_cancellations,
)
from visionyard.runner.adapters.object_staging import BusObjectStager
from visionyard.runner.adapters.process import SubprocessLauncher
from visionyard.runner.adapters.publisher import JetStreamEventPublisher
from visionyard.runner.adapters.staging import BusStager
from visionyard.runner.config import RunnerSettings
from visionyard.runner.devices import GpuPool, detect_gpus
from visionyard.runner.export_inference import ExportInferenceRuns
from visionyard.runner.handlers import CommandConsumer, CommandHandlers, subscribe
from visionyard.runner.service import HeldJobs, RunnerOptions, TrainingAttempts
from visionyard.runner.trainers import build_catalog, discover_manifests
from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.devices import MAX_GPUS_PER_JOB
from visionyard.shared.lifecycle import run_until_signalled
from visionyard.shared.logs import configure_logging
from visionyard.shared.manifest import TrainerManifest
from visionyard.shared.metrics import serve_metrics
from visionyard.shared.tasks import cancel_all
from visionyard.shared.tracing import configure_tracing, shutdown_tracing

log = logging.getLogger("visionyard.runner")


def build_attempts(
    bus: Bus, settings: RunnerSettings, manifests: list[TrainerManifest], *, interpreters: dict[str, str] | None = None
) -> TrainingAttempts:
    """Wire the use case to its NATS and subprocess adapters."""
    work_dir = settings.runner_work_dir
    return TrainingAttempts(
        options=RunnerOptions(
            runner_id=settings.runner_id,
            work_dir=work_dir,
            trainer_python=settings.trainer_python,
            base_env=dict(settings.trainer_base_env),
            cancel_grace_seconds=settings.cancel_grace_seconds,
            stall_seconds=settings.stall_seconds,
            checkpoint_interval_seconds=settings.checkpoint_interval_seconds,
            interpreters=dict(interpreters or {}),
        ),
        manifests=manifests,
        stager=BusStager(bus, cache_dir=work_dir / "cache"),
        launcher=SubprocessLauncher(),
        ledger=KvCancellationLedger(bus),
        terminal=KvTerminalLedger(bus),
        new_sink=lambda: JetStreamEventPublisher(bus),
        held=HeldJobs(),
    )


def gpu_pool(settings: RunnerSettings) -> GpuPool:
    """The runner's GPUs: fake ones when the settings declare them, else the detected/configured ones."""
    if settings.fake_gpus:
        return GpuPool(gpus=[str(index) for index in range(settings.fake_gpus)], fake=True)
    return GpuPool(gpus=detect_gpus(settings.gpus))


def build_export_inference(bus: Bus, manifests: list[TrainerManifest], attempts: TrainingAttempts) -> ExportInferenceRuns:
    """Export and inference runs, sharing the training attempts' settings, staging, launcher and held jobs."""
    return ExportInferenceRuns(
        options=attempts.options, manifests=manifests, stager=attempts.stager, objects=BusObjectStager(bus),
        launcher=attempts.launcher, publisher=bus, held=attempts.held, ledger=attempts.ledger,
    )


async def serve(
    settings: RunnerSettings,
    *,
    stop: asyncio.Event,
    manifests: list[TrainerManifest] | None = None,
) -> None:
    """Run the runner until `stop` is set, then stop trainers, hand back their commands and drain."""
    broker = service_broker(settings.nats_url, service="trainer-runner", **settings.nats_credentials())
    bus = await Bus.from_broker(broker)
    metrics_server = serve_metrics(host=settings.metrics_host, port=settings.metrics_port)
    try:
        await bus.ensure_topology(replicas=settings.stream_replicas)
        # The runner owns its consumer's ack wait: how fast a dead runner's job moves to another.
        if settings.ack_wait is not None:
            await bus.declare_consumer(streams.with_ack_wait(streams.RUNNER, settings.ack_wait))
        consumer_spec = streams.with_ack_wait(streams.RUNNER, await bus.consumer_ack_wait(streams.RUNNER))
        if settings.heartbeat_seconds >= consumer_spec.ack_wait:
            raise ValueError(f"heartbeat_seconds must be < the runner ack wait ({consumer_spec.ack_wait}s)")
        catalog = build_catalog(
            discover_manifests(settings.trainer_dirs) if manifests is None else manifests,
            trainer_envs=settings.trainer_envs, default_python=settings.trainer_python,
        )
        trainers = catalog.manifests
        await publish_capabilities(bus, trainers)
        attempts = build_attempts(bus, settings, trainers, interpreters=catalog.interpreters)
        pool = gpu_pool(settings)
        log.info(
            "runner ready",
            extra={"runner_id": settings.runner_id, "slots": settings.slots, "trainers": [m.name for m in trainers],
                   "gpus": pool.gpus},
        )
        watcher = asyncio.create_task(watch_cancellations(bus, attempts.held, stop=stop))
        for count in range(1, min(pool.total, MAX_GPUS_PER_JOB) + 1):
            await bus.declare_consumer(streams.with_ack_wait(streams.runner_gpu(count), consumer_spec.ack_wait))
        handlers = CommandHandlers(
            attempts, build_export_inference(bus, trainers, attempts), spec=consumer_spec,
            heartbeat_seconds=settings.heartbeat_seconds, dead_letter=bus.dead_letter,
        )
        consumer = CommandConsumer(
            bus, handlers, slots=settings.slots, spec=consumer_spec,
            gpu_pool=pool, runner_id=settings.runner_id, advertise_seconds=settings.advertise_seconds,
        )
        subscribe(broker, handlers, consumer, consumer_spec)
        await broker.start()
        try:
            await stop.wait()
        finally:
            # Stopping the broker stops the consumer: held trainers stop and their commands go back.
            await bus.close()
            await cancel_all([watcher])
    finally:
        if not bus.nc.is_closed:
            await bus.close()
        if metrics_server is not None:
            metrics_server.stop()


def run() -> None:
    """Console entry point `visionyard-runner`."""
    settings = RunnerSettings()
    configure_logging("trainer-runner", settings.log_level)
    configure_tracing("trainer-runner")
    try:
        run_until_signalled(lambda stop: serve(settings, stop=stop))
    finally:
        shutdown_tracing()
