"""Runner settings: production refuses an open NATS connection (the runner holds no other credential)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from visionyard.runner.config import RunnerSettings


def test_production_refuses_nats_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="VISIONYARD_RUNNER_NATS_URL: nats://127.0.0.1:4222 has no credentials"):
        RunnerSettings(mode="production", data_dir=tmp_path)


def test_production_refuses_plaintext_nats_beyond_loopback_unless_vouched_for(tmp_path: Path) -> None:
    url = "nats://runner:secret@nats.nats.svc:4222"
    with pytest.raises(ValidationError, match="VISIONYARD_RUNNER_NATS_ALLOW_PLAINTEXT"):
        RunnerSettings(mode="production", nats_url=url, data_dir=tmp_path)
    assert RunnerSettings(mode="production", nats_url=url, nats_allow_plaintext=True, data_dir=tmp_path).nats_url == url
    assert RunnerSettings(mode="production", nats_url="tls://runner:secret@nats.nats.svc:4222", data_dir=tmp_path)
