"""Fixtures every test directory shares: a real nats-server on a free loopback port; CI's PostgreSQL rule."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from visionyard.shared.bus import Bus
from visionyard.shared.natsserver import NatsServer
from visionyard.shared.s3server import MotoS3Server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream, its file store under the test's tmp dir."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A connected bus with the whole topology declared."""
    connected = await Bus.connect(nats_server.url, service="test")
    await connected.ensure_topology()
    yield connected
    await connected.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint on loopback: moto's standalone server as a subprocess."""
    server = MotoS3Server(log_path=tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server.url
    server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When CI names a PostgreSQL (VISIONYARD_TEST_DATABASE_URL), a `postgresql` test that skips fails instead."""
    report = yield
    if report.skipped and item.get_closest_marker("postgresql") and os.environ.get("VISIONYARD_TEST_DATABASE_URL", "").strip():
        # A skip would let a run that never touched PostgreSQL pass as if it had.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"PostgreSQL test skipped although VISIONYARD_TEST_DATABASE_URL is set: {reason}"
    return report
