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


class TopologySettings(BaseSettings):
    """Stream-topology tuning every service applies when it declares the topology.

    `VISIONYARD_TOPOLOGY_ACK_WAITS='{"tracker": 5, "runner": 4}'` sets consumers' ack waits (seconds)
    by durable name: how long a message a crashed consumer had fetched waits before redelivery.
    Give every service the same value; a service without it keeps whatever the consumer has.
    """

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_TOPOLOGY_", extra="ignore")

    ack_waits: dict[str, float] = {}
