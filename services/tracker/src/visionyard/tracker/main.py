"""Composition root of the tracker: settings, bus, MLflow adapter, consumer and responders.

Run as ONE replica per SQLite store (SQLite has one writer); against an MLflow tracking server the
tracker scales out: replicas share the durable consumer `tracker` and the queue group `tracker`.
"""

from __future__ import annotations

import asyncio
import logging

from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.lifecycle import freeze_startup_heap, run_until_signalled
from visionyard.shared.logs import configure_logging
from visionyard.shared.metrics import serve_metrics
from visionyard.shared.tracing import configure_tracing, shutdown_tracing
from visionyard.tracker.config import TrackerSettings
from visionyard.tracker.handlers import TrackerHandlers, subscribe
from visionyard.tracker.ports import RunStore
from visionyard.tracker.service import Tracker

log = logging.getLogger("visionyard.tracker")
SERVICE = "tracker"


async def serve(
    settings: TrackerSettings, *, stop: asyncio.Event, store: RunStore | None = None, freeze_heap: bool = False
) -> None:
    """Run the tracker until `stop` is set, then drain the NATS connection.

    `freeze_heap` (the console script; not in-process tests): see `freeze_startup_heap`.
    """
    from visionyard.tracker.adapters.event_history import JetStreamStartedEvents

    owned_store = None
    if store is None:
        # Imported here: `import mlflow` costs about a second, and tests may bring their own store.
        from visionyard.tracker.adapters.mlflow_store import MlflowRunStore

        store = owned_store = MlflowRunStore(
            tracking_uri=settings.mlflow_uri, artifact_root=settings.artifact_root,
            # SQLite allows one writer, so this tracker is the store's only one (see TrackerSettings).
            single_writer=settings.mlflow_uri.startswith("sqlite:"),
        )
        try:
            await owned_store.open()
        except Exception as error:  # the store stays lazy: the first batch retries opening it
            log.warning("MLflow store not reachable yet (%s); opening it with the first batch", error)
    if freeze_heap:
        freeze_startup_heap()
    broker = service_broker(settings.nats_url, service=SERVICE, **settings.nats_credentials())
    bus = await Bus.from_broker(broker)
    metrics_server = serve_metrics(host=settings.metrics_host, port=settings.metrics_port)
    try:
        await bus.ensure_topology(replicas=settings.stream_replicas)
        tracker = Tracker(
            store=store,
            publisher=bus,
            started_events=JetStreamStartedEvents(bus),
            experiment_prefix=settings.experiment_prefix,
        )
        handlers = TrackerHandlers(tracker=tracker, dead_letters=bus)
        subscribe(broker, handlers, batch=settings.batch_size, linger=settings.linger_seconds)
        await broker.start()
        log.info("tracker consuming %s into %s", streams.TRACKER.durable, _redacted(settings.mlflow_uri))
        await stop.wait()
    finally:
        await bus.close()
        if owned_store is not None:
            owned_store.close()
        if metrics_server is not None:
            metrics_server.stop()
        log.info("tracker stopped")


def _redacted(uri: str) -> str:
    # A tracking server URI may carry credentials (https://user:pass@host); never log them.
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"


def run() -> None:
    """Console script `visionyard-tracker`: run until SIGTERM/SIGINT, then exit 0."""
    settings = TrackerSettings()
    configure_logging(SERVICE, settings.log_level)
    configure_tracing(SERVICE)
    try:
        run_until_signalled(lambda stop: serve(settings, stop=stop, freeze_heap=True))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    run()
