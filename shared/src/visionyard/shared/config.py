"""Settings every service shares; each service subclasses this with its own env prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Broker location and run mode; `embedded` allows the unsafe single-user defaults."""

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_", extra="ignore")

    mode: Literal["embedded", "production"] = "embedded"
    nats_url: str = "nats://127.0.0.1:4222"
    data_dir: Path = Path(".data")
    stream_replicas: int = 1
    log_level: str = "INFO"
