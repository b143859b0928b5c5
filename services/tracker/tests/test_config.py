"""Tracker settings: production refuses a local MLflow store (and, like every service, an open NATS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from visionyard.tracker.config import TrackerSettings

NATS = "nats://tracker:secret@127.0.0.1:4222"


@pytest.mark.parametrize("uri", [None, "sqlite:///var/mlflow.db", "file:///var/mlruns", "/var/mlruns", "mlruns"])
def test_production_refuses_a_local_mlflow_store(tmp_path: Path, uri: str | None) -> None:
    with pytest.raises(ValidationError, match="refuses a local MLflow store.*VISIONYARD_TRACKER_TRACKING_URI"):
        TrackerSettings(mode="production", nats_url=NATS, tracking_uri=uri, data_dir=tmp_path)


@pytest.mark.parametrize("uri", ["http://mlflow:5000", "https://mlflow.example", "postgresql+psycopg://u:p@db/mlflow"])
def test_production_accepts_a_tracking_server_or_server_database(tmp_path: Path, uri: str) -> None:
    assert TrackerSettings(mode="production", nats_url=NATS, tracking_uri=uri, data_dir=tmp_path).mlflow_uri == uri


def test_production_refuses_an_open_nats(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="VISIONYARD_TRACKER_NATS_URL"):
        TrackerSettings(mode="production", tracking_uri="http://mlflow:5000", data_dir=tmp_path)


def test_embedded_mode_keeps_the_local_sqlite_store(tmp_path: Path) -> None:
    assert TrackerSettings(data_dir=tmp_path).mlflow_uri.startswith("sqlite:///")
