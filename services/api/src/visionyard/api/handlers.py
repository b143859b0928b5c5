"""The API's root adapters: the projector's broker handler, and the HTTP app's routes, error mapping and operations.

Thin: the broker handler decodes what JetStream delivers and hands it to the projection use cases
(`projector`); the HTTP side mounts each domain's router, maps the use cases' errors to statuses, and
answers health, readiness, metrics and the AsyncAPI document from `service.PlatformStatus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from visionyard.api.auth.endpoints import router as auth_router
from visionyard.api.datasets.endpoints import router as datasets_router
from visionyard.api.deployments.endpoints import manage as deployments_manage_router
from visionyard.api.deployments.endpoints import router as deployments_router
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
from visionyard.api.exports.endpoints import router as exports_router
from visionyard.api.inference.endpoints import router as inference_router
from visionyard.api.live.endpoints import router as live_router
from visionyard.api.models.endpoints import router as models_router
from visionyard.api.outbox.relay import OutboxRelay
from visionyard.api.ports import DeadLetters, Delivered
from visionyard.api.projector import Projector
from visionyard.api.projects.endpoints import router as projects_router
from visionyard.api.scheduling.endpoints import router as queues_router
from visionyard.api.service import PlatformStatus
from visionyard.api.telemetry import ApiMetrics
from visionyard.api.training.endpoints import router as training_router
from visionyard.api.validation.endpoints import router as validation_router
from visionyard.shared import streams, subjects
from visionyard.shared.asyncapi import asyncapi_document
from visionyard.shared.bus.broker import Batch, ServiceBroker, consumer
from visionyard.shared.bus.settle import reject
from visionyard.shared.events import decode_dataset_event, decode_export_inference_event, decode_job_event
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.api.handlers")


def decode_event(subject: str, data: bytes) -> Message | None:
    """The event on `subject`, None for event families the API does not project; ValueError if poison."""
    entity = subjects.event_entity(subject)
    if entity == subjects.Entity.JOB:
        return decode_job_event(subject, data)
    if entity == subjects.Entity.DATASET:
        return decode_dataset_event(subject, data)
    if entity in (subjects.Entity.EXPORT, subjects.Entity.INFER):
        return decode_export_inference_event(subject, data)
    return None


class ProjectorHandler:
    """Applies each fetched batch in one transaction (in a worker thread: SQLAlchemy here is sync)."""

    def __init__(
        self,
        *,
        projector: Projector,
        dead_letters: DeadLetters,
        prepare: Callable[[Message], Awaitable[Message]] | None = None,
    ) -> None:
        self._projector = projector
        self._dead_letters = dead_letters
        # Async enrichment before the (threaded, transactional) projection, e.g. loading staged results.
        self._prepare = prepare
        self.lag = 0
        self.applied = 0

    async def on_events(self, batch: Batch) -> None:
        """`evt.>` through the `api-projector` consumer, a batch at a time (the standing pull's)."""
        await self.handle_batch(batch.raw_message)

    async def handle_batch(self, messages: Sequence[Delivered]) -> None:
        """Decode, apply, dead-letter the poison; raising naks the whole batch (applied all-or-nothing)."""
        decoded: list[tuple[Delivered, Message]] = []
        for msg in messages:
            try:
                event = decode_event(msg.subject, msg.data)
            except ValueError as error:
                await self._reject(msg, f"undecodable event: {error}")
                continue
            if event is not None:
                if self._prepare is not None:
                    event = await self._prepare(event)
                decoded.append((msg, event))
        rejected = await asyncio.to_thread(self._projector.apply_batch, decoded)
        for poison in rejected:
            await self._reject(poison.token, poison.reason)
        self.applied += len(decoded) - len(rejected)
        if messages and messages[-1].metadata is not None:
            self.lag = messages[-1].metadata.num_pending

    async def _reject(self, msg: Delivered, reason: str) -> None:
        await reject(self._dead_letters, msg, consumer=streams.API_PROJECTOR.durable, reason=reason)


def subscribe(broker: ServiceBroker, projector: ProjectorHandler, *, batch: int) -> None:
    """Declare the API's projector subscriber on `broker` (the scheduler's is `scheduling.handlers.subscribe`)."""
    consumer(broker, streams.API_PROJECTOR, batch=batch, batched=True,
             description="Every event into the API's database, a batch per transaction")(projector.on_events)


def include_routers(app: FastAPI) -> None:
    """Mount every domain's HTTP and WebSocket routes."""
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
    app.include_router(live_router)


def install_error_handlers(app: FastAPI) -> None:
    """Map the use cases' errors to HTTP statuses, and invalid requests to one 422 naming each field."""
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


def install_operational_routes(app: FastAPI) -> None:
    """Health, readiness, Prometheus metrics and the AsyncAPI document."""
    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/health/ready", tags=["operations"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: the database answers and the broker is connected."""
        status: PlatformStatus = request.app.state.platform_status
        bus = getattr(request.app.state, "bus", None)
        readiness = await status.readiness(bus.nc if bus is not None else None)
        ok = readiness.ready
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ready" if ok else "not ready", **readiness.checks})

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
            metrics.set_jobs(await asyncio.to_thread(request.app.state.platform_status.jobs_by_status))
        live = getattr(request.app.state, "live_stats", None)
        if live is not None:
            metrics.websocket_clients.set(live.connections)
            metrics.dropped_slow_clients = live.dropped_slow_clients
        return Response(content=await asyncio.to_thread(metrics.exposition), media_type="text/plain; version=0.0.4")

    document = asyncapi_document()

    @app.get("/asyncapi", tags=["operations"])
    @app.get("/asyncapi.json", tags=["operations"], include_in_schema=False)
    async def asyncapi() -> dict[str, Any]:
        """The AsyncAPI document of every command, event, request-reply and hint subject, generated by FastStream
        from the shared contracts."""
        return document
