"""Fixtures of the API tests: settings on a temp dir, a migrated database, a live app client.

The database is SQLite under the test's tmp dir, or a fresh PostgreSQL schema when
`VISIONYARD_TEST_DATABASE_URL` is set (CI): then every database test here runs on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.config import ApiSettings
from visionyard.api.db.migrate import upgrade_to_head
from visionyard.api.db.session import make_engine, make_session_factory
from visionyard.api.main import create_app
from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import ServiceBroker, attached, responder
from visionyard.shared.manifest import ModelInfo, TrainerManifest

from .pgschema import fresh_postgres_schema, fresh_postgres_url, postgres_required

CLASSIFIER = TrainerManifest(
    name="classifier",
    framework="pytorch",
    version="0.1.0",
    module="visionyard.trainers.classifier",
    task_types=["image_classification"],
    models=[
        ModelInfo(model_name="simple_cnn", display_name="Simple CNN", task_types=["image_classification"]),
        ModelInfo(model_name="tiny_resnet", display_name="Tiny ResNet", task_types=["image_classification"]),
    ],
    dataset_formats=["imagefolder"],
    config_schema={"fields": [{"name": "epochs", "type": "int"}]},
)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[ApiSettings]:
    """Embedded-mode settings with everything under the test's tmp dir (the database on CI's PostgreSQL)."""
    if not postgres_required():
        yield ApiSettings(data_dir=tmp_path / "data", outbox_poll_seconds=0.1)
        return
    with fresh_postgres_url() as database_url:
        yield ApiSettings(data_dir=tmp_path / "data", outbox_poll_seconds=0.1, database_url=database_url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def session_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A migrated database of each supported kind, so repository-level tests run on both.

    PostgreSQL: a fresh schema, dropped afterwards; skipped when unreachable unless CI requires it.
    """
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'unit.db'}")
        upgrade_to_head(engine)
        yield make_session_factory(engine)
        engine.dispose()
        return
    with fresh_postgres_schema() as (engine, _schema):
        upgrade_to_head(engine)
        yield make_session_factory(engine)


async def until(predicate: Callable[[], Awaitable[Any]], *, timeout: float = 20.0) -> Any:
    """Poll an async predicate until it returns something truthy (bounded, so a bug fails the test)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(bus: Bus, settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on a running app (lifespan started: migrations, outbox relay, projector)."""
    kv = await bus.kv(streams.KV_CAPABILITIES)
    await kv.put(CLASSIFIER.name, CLASSIFIER.model_dump_json().encode())
    app = create_app(settings, bus=bus)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


class FakeServices:
    """Stand-ins for other services (storage, the tracker) answering requests on the test's bus, through the
    FastStream binders as the real ones do; each handler is pydantic-typed like the real service's."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._brokers: list[ServiceBroker] = []

    async def answer(self, service: str, handlers: Mapping[str, Callable[..., Awaitable[Any]]]) -> None:
        """Answer requests on each subject with its handler, in `service`'s queue group; from now until the test ends."""
        broker = attached(self.bus, service=service)
        for subject, handler in handlers.items():
            responder(broker, subject, queue=service)(handler)
        await broker.start()
        self._brokers.append(broker)

    async def stop(self) -> None:
        """Stop every fake's subscribers (the bus stays open: it is the test's)."""
        for broker in reversed(self._brokers):
            await broker.stop()
        self._brokers.clear()


@pytest.fixture
async def fake_services(bus: Bus) -> AsyncIterator[FakeServices]:
    """Fake services on the test's bus, stopped when the test ends."""
    fakes = FakeServices(bus)
    yield fakes
    await fakes.stop()
