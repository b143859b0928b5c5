"""Composition root of the API: settings, database, bus, outbox relay, projector, routes; `run()` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import text

from visionyard.api import ws
from visionyard.api.adapters.capabilities import KvCapabilitySource
from visionyard.api.adapters.tracker import BusTrackerClient
from visionyard.api.auth import tokens
from visionyard.api.auth.endpoints import router as auth_router
from visionyard.api.auth.objects import ObjectAccess
from visionyard.api.auth.service import AuthService, admin_login_file
from visionyard.api.config import ApiSettings
from visionyard.api.datasets.endpoints import router as datasets_router
from visionyard.api.adapters.dataset_storage import BusDatasetStorage
from visionyard.api.datasets.service import DatasetService
from visionyard.api.datasets.versions import DatasetVersionService
from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.repositories import JobRepository
from visionyard.api.deployments.endpoints import manage as deployments_manage_router
from visionyard.api.deployments.endpoints import router as deployments_router
from visionyard.api.deployments.keys import DeploymentKeys
from visionyard.api.deployments.service import DeploymentService
from visionyard.api.db.session import UnitOfWork, make_engine, make_session_factory
from visionyard.api.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayTimeout,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    UpstreamFailed,
)
from visionyard.api.adapters.storage_client import BusStorageClient
from visionyard.api.db import models_exports  # noqa: F401  (registers the export/inference tables)
from visionyard.api.exports.endpoints import router as exports_router
from visionyard.api.exports.service import ExportService
from visionyard.api.handlers import ProjectorHandler
from visionyard.api.inference.endpoints import router as inference_router
from visionyard.api.inference.results_loader import InferenceResultsLoader
from visionyard.api.inference.service import InferenceService
from visionyard.api.models.endpoints import router as models_router
from visionyard.api.outbox import OutboxRelay
from visionyard.api.projects.endpoints import router as projects_router
from visionyard.api.projects.service import ProjectService
from visionyard.api.projector import Projector, RetryPolicy
from visionyard.api.adapters.scheduling_kv import KvQueueStatus
from visionyard.api.scheduling.endpoints import router as queues_router
from visionyard.api.scheduling.handlers import SchedulerRuntime
from visionyard.api.scheduling.service import QueueService
from visionyard.api.telemetry import ApiMetrics
from visionyard.api.training.endpoints import router as training_router
from visionyard.api.training.service import TrainingService
from visionyard.api.validation.endpoints import router as validation_router
from visionyard.api.validation.service import ValidationService
from visionyard.shared import streams
from visionyard.shared.asyncapi import asyncapi_document
from visionyard.shared.bus import Bus
from visionyard.shared.lifecycle import freeze_startup_heap
from visionyard.shared.logs import configure_logging
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
        connected = bus or await Bus.connect(settings.nats_url, service="api", **settings.nats_credentials())
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
        workers = [
            asyncio.create_task(relay.run(stop), name="outbox-relay"),
            asyncio.create_task(
                connected.consume_batches(
                    streams.API_PROJECTOR, projector_handler.handle_batch, stop=stop, batch=settings.projector_batch
                ),
                name="projector",
            ),
        ]
        if settings.scheduler:
            # Every replica stands for the scheduler lease; the one holding it admits jobs (docs/scheduling.md).
            app.state.scheduler = SchedulerRuntime(
                connected, lookahead_seconds=settings.scheduler_lookahead_seconds)
            workers.append(asyncio.create_task(app.state.scheduler.run(stop), name="scheduler"))
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
            _, pending = await asyncio.wait(workers, timeout=SHUTDOWN_GRACE_SECONDS)
            for task in pending:
                task.cancel()
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
    app.middleware("http")(metrics.middleware)
    # Outermost, so that preflights and error answers carry the CORS headers too.
    app.add_middleware(
        CORSMiddleware, allow_origins=settings.cors_origins, allow_origin_regex=settings.allows_origin_regex(),
        allow_credentials=True, allow_methods=["*"], allow_headers=["*"],
    )
    _install_error_handlers(app)
    app.include_router(auth_router)
    app.include_router(projects_router)
    app.include_router(training_router)
    app.include_router(models_router)
    app.include_router(datasets_router)
    # Before the export routes: `/export/deployments` must not be read as an export id.
    app.include_router(deployments_manage_router)
    app.include_router(deployments_router)
    app.include_router(exports_router)
    app.include_router(inference_router)
    app.include_router(validation_router)
    app.include_router(queues_router)
    app.include_router(ws.router)
    _install_operational_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    statuses: dict[type[Exception], int] = {
        NotFound: 404, Conflict: 409, InvalidInput: 422, TooLarge: 413, Unavailable: 503, Forbidden: 403,
        Unauthorized: 401, BadRequest: 400, GatewayTimeout: 504, UpstreamFailed: 502,
    }
    for error_type, status in statuses.items():

        async def handle(_: Request, error: Exception, status: int = status) -> JSONResponse:
            return JSONResponse(status_code=status, content={"detail": str(error)})

        app.add_exception_handler(error_type, handle)

    async def invalid_request(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = []
        for item in error.errors():
            location = [str(part) for part in item.get("loc", ())]
            # Only the first element says where (body, query, ...): a field may itself be called "path".
            if location and location[0] in ("body", "query", "path", "header", "cookie"):
                location = location[1:]
            problems.append(f"{'.'.join(location) or 'body'}: {item.get('msg', 'invalid')}")
        return JSONResponse(
            status_code=422,
            content={"detail": "; ".join(problems), "errors": _jsonable_errors(error.errors())},
        )

    app.add_exception_handler(RequestValidationError, invalid_request)


def _jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    return [{"loc": list(item.get("loc", ())), "msg": str(item.get("msg")), "type": str(item.get("type"))} for item in errors]


def _install_operational_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["operations"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the database answers and the broker is connected."""
        checks = {"database": "ok", "broker": "ok"}
        try:
            await asyncio.to_thread(_ping_database, request.app.state.session_factory)
        except Exception as error:
            checks["database"] = f"unavailable: {error}"
        bus: Bus | None = getattr(request.app.state, "bus", None)
        if bus is None or not bus.nc.is_connected:
            checks["broker"] = "unavailable: not connected"
        ok = all(value == "ok" for value in checks.values())
        return JSONResponse(status_code=200 if ok else 503, content={"status": "ready" if ok else "not ready", **checks})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus exposition."""
        metrics: ApiMetrics = request.app.state.metrics
        relay: OutboxRelay | None = getattr(request.app.state, "relay", None)
        projector: ProjectorHandler | None = getattr(request.app.state, "projector", None)
        if relay is not None:
            with contextlib.suppress(Exception):
                metrics.outbox_backlog.set(await asyncio.to_thread(relay.count_backlog))
            metrics.outbox_published.set(relay.published)
        if projector is not None:
            metrics.projector_lag.set(projector.lag)
            metrics.projector_applied.set(projector.applied)
        with contextlib.suppress(Exception):
            metrics.set_jobs(await asyncio.to_thread(_count_jobs, request.app.state.session_factory))
        live = getattr(request.app.state, "live_stats", None)
        if live is not None:
            metrics.websocket_clients.set(live.connections)
            metrics.dropped_slow_clients = live.dropped_slow_clients
        return Response(content=await asyncio.to_thread(metrics.exposition), media_type="text/plain; version=0.0.4")

    @app.get("/asyncapi.json", tags=["operations"])
    async def asyncapi() -> dict[str, Any]:
        """The AsyncAPI document of every command and event, generated from the shared contracts."""
        return asyncapi_document()


def _count_jobs(session_factory: Any) -> dict[str, int]:
    with session_factory() as session:
        return JobRepository(session).count_by_status()


def _ping_database(session_factory: Any) -> None:
    with session_factory() as session:
        session.execute(text("SELECT 1"))


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
