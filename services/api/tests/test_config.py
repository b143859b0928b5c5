"""Settings: unsafe defaults refuse to start outside the embedded mode; the console script exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from visionyard.api.config import ApiSettings
from visionyard.shared.natsserver import NatsServer, free_port


def test_production_refuses_anonymous_access_and_a_missing_signing_key(tmp_path: Path) -> None:
    nats_url = "nats://api:secret@127.0.0.1:4222"  # production also refuses a NATS URL without credentials
    with pytest.raises(ValidationError, match="jwt_secret"):
        ApiSettings(mode="production", nats_url=nats_url, data_dir=tmp_path)
    with pytest.raises(ValidationError, match="anonymous_as_admin"):
        ApiSettings(mode="production", nats_url=nats_url, data_dir=tmp_path, jwt_secret="x" * 32,
                    anonymous_as_admin=True)
    with pytest.raises(ValidationError, match="VISIONYARD_API_NATS_URL"):
        ApiSettings(mode="production", data_dir=tmp_path, jwt_secret="x" * 32)
    settings = ApiSettings(mode="production", nats_url=nats_url, data_dir=tmp_path, jwt_secret="x" * 32)
    assert settings.anonymous_as_admin is False and settings.open_registration is False
    assert settings.allows_origin_regex() is None


def test_embedded_defaults_open_the_one_person_install(tmp_path: Path) -> None:
    settings = ApiSettings(data_dir=tmp_path)
    assert settings.anonymous_as_admin is True and settings.open_registration is True
    assert settings.allows_origin_regex() is not None


def test_keys_and_origins_from_env_and_default_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISIONYARD_API_API_KEYS", "a, b")
    monkeypatch.setenv("VISIONYARD_API_CORS_ORIGINS", "https://ui.example.com")
    monkeypatch.setenv("VISIONYARD_API_DATA_DIR", str(tmp_path))
    settings = ApiSettings()
    assert settings.api_keys == ["a", "b"]
    assert settings.cors_origins == ["https://ui.example.com"]
    assert settings.allows_origin_regex() is None  # an explicit list replaces the loopback default
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'api.db'}"


@pytest.mark.integration
def test_console_script_serves_then_exits_zero_on_sigterm(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats").start()
    port = free_port()
    env = {**os.environ, "VISIONYARD_API_NATS_URL": server.url, "VISIONYARD_API_DATA_DIR": str(tmp_path / "data"),
           "VISIONYARD_API_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-c", "from visionyard.api.main import run; run()"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = False
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1) as reply:
                    ready = reply.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        assert ready, "the API never became ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert (tmp_path / "data" / "api.db").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.stop()


def test_event_loop_choice(tmp_path: Path) -> None:
    import uvloop

    from visionyard.api.main import _loop_factory

    assert _loop_factory("auto") is uvloop.new_event_loop  # installed with uvicorn[standard]
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is None
    with pytest.raises(ValidationError, match="event_loop"):
        ApiSettings(event_loop="trio", data_dir=tmp_path)
