"""Composition root of the API: settings, database, bus, adapters, use cases and workers, with the HTTP and broker
adapters of `handlers` mounted on the app; `run()` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import ValidationError

from visionyard.api.adapters.capabilities import KvCapabilitySource
from visionyard.api.adapters.dataset_storage import BusDatasetStorage
from visionyard.api.adapters.scheduling_kv import KvQueueStatus
from visionyard.api.adapters.storage_client import BusStorageClient
from visionyard.api.adapters.tracker import BusTrackerClient
from visionyard.api.auth import tokens
from visionyard.api.auth.objects import ObjectAccess
from visionyard.api.auth.service import AuthService, admin_login_file
from visionyard.api.config import ApiSettings
from visionyard.api.datasets.service import DatasetService
from visionyard.api.datasets.versions import DatasetVersionService
from visionyard.api.db import models_exports  # noqa: F401  (registers the export/inference tables)
from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.session import UnitOfWork, make_engine, make_session_factory
from visionyard.api.deployments.keys import DeploymentKeys
from visionyard.api.deployments.service import DeploymentService
from visionyard.api.exports.service import ExportService
from visionyard.api.handlers import (
    ProjectorHandler,
    include_routers,
    install_error_handlers,
    install_operational_routes,
    subscribe,
)
from visionyard.api.inference.results_loader import InferenceResultsLoader
from visionyard.api.inference.service import InferenceService
from visionyard.api.outbox.relay import OutboxRelay
from visionyard.api.projector import Projector
from visionyard.api.projects.service import ProjectService
from visionyard.api.scheduling.handlers import SchedulerRuntime
from visionyard.api.scheduling.handlers import subscribe as subscribe_scheduler
from visionyard.api.scheduling.service import QueueService
from visionyard.api.service import PlatformStatus
from visionyard.api.telemetry import ApiMetrics
from visionyard.api.training.projection import RetryPolicy
from visionyard.api.training.service import TrainingService
from visionyard.api.validation.service import ValidationService
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import attached, service_broker
from visionyard.shared.lifecycle import freeze_startup_heap
from visionyard.shared.logs import configure_logging
from visionyard.shared.tasks import cancel_all
from visionyard.shared.tracing import configure_tracing, shutdown_tracing

log = logging.getLogger("visionyard.api")

SHUTDOWN_GRACE_SECONDS = 10.0


def create_app(settings: ApiSettings | None = None, *, bus: Bus | None = None) -> FastAPI:
    """The FastAPI app; its lifespan connects the bus (unless one is given), migrates, and runs the workers."""
    settings = settings or ApiSettings()
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    metrics = ApiMetrics()
    account_uow = UnitOfWork(session_factory)
    secret = settings.jwt_secret or tokens.embedded_secret(settings.data_dir)
    auth = AuthService(
        uow=account_uow, secret=secret,
        access_minutes=settings.access_token_minutes, refresh_days=settings.refresh_token_days,
        settings_keys=settings.api_keys, anonymous_as_admin=bool(settings.anonymous_as_admin),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(upgrade_to_head, engine)
        await asyncio.to_thread(auth.bootstrap, email=settings.admin_email, password=settings.admin_password,
                                embedded=settings.mode == "embedded", login_file=admin_login_file(settings.data_dir))
        if bus is None:
            broker = service_broker(settings.nats_url, service="api", **settings.nats_credentials())
            connected = await Bus.from_broker(broker)
        else:
            broker, connected = attached(bus, service="api"), bus
        await connected.ensure_topology(replicas=settings.stream_replicas)
        relay = OutboxRelay(
            session_factory=session_factory, publisher=connected, poll_seconds=settings.outbox_poll_seconds,
            batch=settings.outbox_batch,
        )
        uow = UnitOfWork(session_factory, after_commit=relay.kick)
        capabilities = KvCapabilitySource(connected)
        projector = Projector(
            session_factory, retry=RetryPolicy(max_attempts=settings.max_attempts), after_commit=relay.kick
        )
        projector_handler = ProjectorHandler(
            projector=projector, dead_letters=connected, prepare=InferenceResultsLoader(connected)
        )
        app.state.bus = connected
        app.state.relay = relay
        app.state.projector = projector_handler
        app.state.capabilities = capabilities
        app.state.training = TrainingService(
            uow=uow, capabilities=capabilities, tracker=BusTrackerClient(connected, timeout=settings.request_timeout)
        )
        storage_client = BusStorageClient(connected, timeout=settings.request_timeout)
        app.state.exports = ExportService(uow=uow, capabilities=capabilities, storage=storage_client)
        app.state.inference = InferenceService(uow=uow, storage=storage_client)
        app.state.deployments = DeploymentService(uow=uow, keys=DeploymentKeys(secret), inference=app.state.inference,
                                                  package_ticket=auth.download_ticket)
        app.state.datasets = DatasetService(uow=uow, staging=connected)
        app.state.dataset_versions = DatasetVersionService(
            uow=uow, storage=BusDatasetStorage(connected, timeout=settings.request_timeout),
            spool_dir=settings.data_dir / "tmp" / "images",
        )
        app.state.queues = QueueService(uow=uow, status=KvQueueStatus(connected))
        stop = asyncio.Event()
        workers = [asyncio.create_task(relay.run(stop), name="outbox-relay")]
        subscribe(broker, projector_handler, batch=settings.projector_batch)
        if settings.scheduler:
            # Every replica stands for the scheduler lease; the one holding it admits jobs (docs/scheduling.md).
            app.state.scheduler = SchedulerRuntime(
                connected, lookahead_seconds=settings.scheduler_lookahead_seconds)
            subscribe_scheduler(broker, app.state.scheduler)
        await broker.start()
        log.info("api started", extra={"service": "api"})
        try:
            yield
        finally:
            stop.set()
            hub = getattr(app.state, "live_hub", None)
            if hub is not None:
                await hub.close()
            positions = getattr(app.state, "queue_positions", None)
            if positions is not None:
                await positions.close()
            # The projector's and the scheduler's subscribers finish their batch; the connection stays open for the
            # outbox relay's last publishes, then drains.
            await broker.stop_subscribers()
            _, pending = await asyncio.wait(workers, timeout=SHUTDOWN_GRACE_SECONDS)
            await cancel_all(pending)
            await asyncio.gather(*workers, return_exceptions=True)
            if bus is None:
                await connected.close()  # drain: buffered publishes reach the server first
            engine.dispose()
            log.info("api stopped", extra={"service": "api"})

    app = FastAPI(title="Visionyard API", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.metrics = metrics
    app.state.auth = auth
    app.state.projects = ProjectService(uow=account_uow)
    app.state.access = ObjectAccess(uow=account_uow)
    app.state.validation = ValidationService(uow=account_uow)
    app.state.platform_status = PlatformStatus(session_factory)
    app.middleware("http")(metrics.middleware)
    # Outermost, so that preflights and error answers carry the CORS headers too.
    app.add_middleware(
        CORSMiddleware, allow_origins=settings.cors_origins, allow_origin_regex=settings.allows_origin_regex(),
        allow_credentials=True, allow_methods=["*"], allow_headers=["*"],
    )
    install_error_handlers(app)
    include_routers(app)
    install_operational_routes(app)
    return app


def run() -> None:
    """Console entry point: serve until SIGTERM/SIGINT, then drain and exit 0."""
    try:
        settings = ApiSettings()
    except ValidationError as error:
        configure_logging("api")
        reasons = "; ".join(str(item.get("msg")) for item in error.errors())
        log.error("refusing to start: %s", reasons)
        print(f"visionyard-api: refusing to start: {reasons}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("api", settings.log_level)
    configure_tracing("api")
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(settings))
    finally:
        shutdown_tracing()


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for "uvloop", and for "auto" when it is installed; None means asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("visionyard-api: event_loop is uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


async def _serve(settings: ApiSettings) -> None:
    import uvicorn

    # No per-message deflate on WebSockets: compressing each small live message for each client was
    # a fifth of the API's CPU under live load (profiled), for little saving on small JSON frames.
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                            ws_per_message_deflate=False)
    server = _QuietSignalServer(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # A signal starts a graceful shutdown: the lifespan stops the workers and drains NATS.
        loop.add_signal_handler(signum, server.request_exit)
    serving = asyncio.create_task(server.serve())
    # Once started (imports, app, lifespan: migrations, engine, bus), the heap is the long-lived part.
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        freeze_startup_heap()
    await serving


class _QuietSignalServer:
    """uvicorn's server without its signal capture, which re-raises SIGTERM and so exits non-zero."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        self._server = Server(config)

    @property
    def started(self) -> bool:
        """Whether start-up (the lifespan included) is done and the socket is listening."""
        return bool(self._server.started)

    def request_exit(self) -> None:
        """Begin the graceful shutdown."""
        self._server.should_exit = True

    async def serve(self) -> None:
        """Serve until asked to exit."""
        await self._server.serve()
