"""Composition root of the storage service: settings, bus, backend, handlers; runs until a signal."""

from __future__ import annotations

import asyncio
import logging
import sys

from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.lifecycle import run_until_signalled
from visionyard.shared.logs import configure_logging
from visionyard.shared.metrics import serve_metrics
from visionyard.shared.tracing import configure_tracing, shutdown_tracing
from visionyard.storage.adapters.local import LocalDirectoryBackend
from visionyard.storage.adapters.s3 import S3Backend
from visionyard.storage.adapters.staging import BusStagingArea
from visionyard.storage.archive import ArchiveLimits
from visionyard.storage.config import StorageSettings
from visionyard.storage.handlers import StorageHandlers, subscribe
from visionyard.storage.ports import ObjectBackend
from visionyard.storage.service import Buckets, StorageService

log = logging.getLogger("visionyard.storage")


def build_backend(settings: StorageSettings) -> ObjectBackend:
    """The configured object backend: a local directory or S3."""
    if settings.backend == "s3":
        return S3Backend(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
            secret_access_key=(
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
            ),
        )
    return LocalDirectoryBackend(settings.storage_root)


def build_service(settings: StorageSettings, *, bus: Bus, backend: ObjectBackend) -> StorageService:
    """The use cases wired to the bus and the backend."""
    return StorageService(
        backend=backend,
        staging=BusStagingArea(bus),
        publisher=bus,
        workdir=settings.work_dir,
        buckets=Buckets(external=settings.external_bucket, internal=settings.internal_bucket),
        limits=ArchiveLimits(
            max_upload_bytes=settings.max_upload_bytes,
            max_uncompressed_bytes=settings.max_uncompressed_bytes,
            max_compression_ratio=settings.max_compression_ratio,
            max_files=settings.max_files,
        ),
    )


async def serve(settings: StorageSettings, *, stop: asyncio.Event, backend: ObjectBackend | None = None) -> None:
    """Run the consumers and request handlers until `stop` is set, then drain the connection."""
    broker = service_broker(settings.nats_url, service="storage", **settings.nats_credentials())
    bus = await Bus.from_broker(broker)
    metrics_server = serve_metrics(host=settings.metrics_host, port=settings.metrics_port)
    handlers: StorageHandlers | None = None
    try:
        await bus.ensure_topology(replicas=settings.stream_replicas)
        backend = backend or build_backend(settings)
        if settings.create_buckets:
            await asyncio.to_thread(backend.ensure_buckets, [settings.external_bucket, settings.internal_bucket])
        handlers = StorageHandlers(build_service(settings, bus=bus, backend=backend))
        subscribe(broker, handlers)
        await broker.start()
        log.info("storage service running on the %s backend", settings.backend)
        await stop.wait()
    finally:
        await bus.close()
        if handlers is not None:
            await handlers.service.incoming.close()
        if metrics_server is not None:
            metrics_server.stop()
        log.info("storage service stopped")


def run() -> None:
    """Console script `visionyard-storage`: run until SIGTERM/SIGINT, then exit 0."""
    settings = StorageSettings()
    configure_logging("storage", settings.log_level)
    configure_tracing("storage")
    try:
        run_until_signalled(lambda stop: serve(settings, stop=stop))
    finally:
        shutdown_tracing()
    sys.exit(0)


if __name__ == "__main__":
    run()
