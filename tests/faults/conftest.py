"""Fixtures of the fault-injection suite: moto's S3 server, one embedded stack (2 runners, S3 storage,
short ack waits) shared by every scenario, a REST client, the digits dataset, and the figures sink."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.cli.datasets_digits import build_digits_imagefolder
from visionyard.cli.stack import EmbeddedStack
from visionyard.shared.natsserver import free_port

S3_KEY = "testing"
INTERNAL_BUCKET = "faults-internal"
EXTERNAL_BUCKET = "faults-external"
# Short enough that a crashed consumer's fetched messages come back in seconds, long enough that a
# busy but healthy service on a 2-core machine never loses a message it is working on.
ACK_WAITS = {"runner": 4.0, "tracker": 6.0, "storage-artifacts": 6.0, "api-projector": 6.0}

FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[EmbeddedStack]:
    """The whole stack as processes: nats-server, api, tracker, storage (S3 on moto), two runners."""
    embedded = EmbeddedStack(
        data_dir=tmp_path_factory.mktemp("faults-stack"),
        api_port=free_port(),
        runners=2,
        storage_backend="s3",
        storage_env={
            "VISIONYARD_STORAGE_S3_ENDPOINT_URL": s3_endpoint,
            "VISIONYARD_STORAGE_S3_ACCESS_KEY_ID": S3_KEY,
            "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY": S3_KEY,
            "VISIONYARD_STORAGE_INTERNAL_BUCKET": INTERNAL_BUCKET,
            "VISIONYARD_STORAGE_EXTERNAL_BUCKET": EXTERNAL_BUCKET,
        },
        extra_env={
            "VISIONYARD_TOPOLOGY_ACK_WAITS": json.dumps(ACK_WAITS),
            "VISIONYARD_RUNNER_HEARTBEAT_SECONDS": "1",
            # Every checkpoint staged (no cadence): the scenarios strike a 6-epoch job between its
            # second checkpoint and its end, and epochs here are shorter than any useful interval.
            "VISIONYARD_RUNNER_CHECKPOINT_INTERVAL_SECONDS": "0",
            "VISIONYARD_RUNNER_SLOTS": "1",
            "VISIONYARD_RUNNER_CANCEL_GRACE_SECONDS": "5",
        },
    )
    with embedded:
        yield embedded


@pytest.fixture(scope="session")
def api(stack: EmbeddedStack) -> Iterator[httpx.Client]:
    """A REST client of the stack's API."""
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def dataset_id(api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits ImageFolder, uploaded and ready."""
    scratch = tmp_path_factory.mktemp("digits")
    build_digits_imagefolder(scratch / "digits.zip", scratch / "heldout")
    created = api.post("/api/v1/datasets", json={"name": "digits", "visibility": "private"})
    assert created.status_code in (200, 201), created.text
    identifier = str(created.json()["dataset_id"])
    with (scratch / "digits.zip").open("rb") as handle:
        uploaded = api.post(f"/api/v1/datasets/{identifier}/upload",
                            files={"file": ("digits.zip", handle, "application/zip")})
    assert uploaded.status_code == 202, uploaded.text
    deadline = time.monotonic() + 120
    while True:
        dataset = api.get(f"/api/v1/datasets/{identifier}").json()
        if dataset["status"] in ("ready", "rejected"):
            break
        assert time.monotonic() < deadline, dataset
        time.sleep(0.3)
    assert dataset["status"] == "ready", dataset
    return identifier


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every scenario's measured figures are written (JSON list)."""
    return tmp_path_factory.getbasetemp() / "fault-figures.json"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print each scenario's figures at the end of the run, so CI logs carry them without `-s`."""
    if not FIGURES:
        return
    terminalreporter.section("fault-injection figures")
    for figure in FIGURES:
        terminalreporter.write_line(json.dumps(figure, sort_keys=True))


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> dict[str, Any]:
    """A boto3 client of moto's S3 and the bucket checkpoints are stored in."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
                          region_name="us-east-1")
    return {"client": client, "bucket": INTERNAL_BUCKET}


@pytest.fixture(scope="session")
def figures() -> list[dict[str, Any]]:
    """Figures recorded by the scenarios, printed in the terminal summary."""
    return FIGURES
