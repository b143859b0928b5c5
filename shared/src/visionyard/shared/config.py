"""Settings every service shares; each service subclasses this with its own env prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Hosts a plaintext NATS connection may reach without leaving the machine.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def server_urls(nats_url: str) -> list[str]:
    """The servers of a NATS URL that may list a cluster's nodes separated by commas."""
    return [part.strip() for part in nats_url.split(",") if part.strip()]


def nats_url_user(nats_url: str) -> str | None:
    """The user named in a NATS URL (`nats://user:password@host`; the first server's), if any."""
    servers = server_urls(nats_url) or [nats_url]
    parts = urlsplit(servers[0] if "://" in servers[0] else f"nats://{servers[0]}")
    return parts.username or None


def unsafe_nats_urls(nats_url: str, *, allow_plaintext: bool, has_user: bool = False) -> list[str]:
    """Why each server of `nats_url` is unsafe for production (empty: it is safe).

    A server must be reached with credentials (`nats://user:password@host`, `nats://token@host`, or the
    settings' `nats_user`/`nats_password`: `has_user`), and
    with TLS (`tls://`) unless it is on loopback or the operator vouches for a private network.
    """
    problems: list[str] = []
    for server in server_urls(nats_url) or [nats_url]:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        if not parts.username and not has_user:
            problems.append(f"{shown} has no credentials (nats://user:password@host)")
        if parts.scheme != "tls" and parts.hostname not in LOOPBACK_HOSTS and not allow_plaintext:
            problems.append(f"{shown} is plaintext beyond loopback (use tls://, or set NATS_ALLOW_PLAINTEXT=true "
                            "for a private network)")
    return problems


class NatsCredentials(TypedDict):
    """Keyword arguments naming the NATS user (None: the one the URL names, or none)."""

    user: str | None
    password: str | None


class ServiceSettings(BaseSettings):
    """Broker location and run mode; `embedded` allows the unsafe single-user defaults."""

    # hide_input_in_errors: a refusal at start-up must not print the settings' secrets (NATS passwords,
    # S3 keys, database URLs) into the logs; the message names the variable instead.
    model_config = SettingsConfigDict(env_prefix="VISIONYARD_", extra="ignore", hide_input_in_errors=True)

    mode: Literal["embedded", "production"] = "embedded"
    nats_url: str = "nats://127.0.0.1:4222"
    # The service's own NATS user (`shared/permissions.py`), unless the URL names it; `visionyard up`
    # generates both.
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    data_dir: Path = Path(".data")
    stream_replicas: int = 1
    log_level: str = "INFO"
    # Production refuses a plaintext nats:// server beyond loopback unless this says the network between
    # the service and NATS is private (a cluster-internal network, a compose network).
    nats_allow_plaintext: bool = False

    @model_validator(mode="after")
    def _refuse_unsafe_nats(self) -> ServiceSettings:
        # Every service, not only the API: anyone reaching an open NATS can forge commands and events.
        if self.mode == "production":
            problems = unsafe_nats_urls(self.nats_url, allow_plaintext=self.nats_allow_plaintext,
                                        has_user=bool(self.nats_user and self.nats_password))
            if problems:
                prefix = self.model_config.get("env_prefix", "VISIONYARD_")
                raise ValueError(f"production mode refuses {prefix}NATS_URL: " + "; ".join(problems)
                                 + f" (see {prefix}NATS_ALLOW_PLAINTEXT)")
        return self

    def nats_credentials(self) -> NatsCredentials:
        """The `user` and `password` keyword arguments of `Bus.connect` and `service_broker`."""
        password = self.nats_password.get_secret_value() if self.nats_password is not None else None
        return {"user": self.nats_user, "password": password}


class MetricsSettings(BaseSettings):
    """Where a service serves Prometheus `/metrics` (the API serves it on its own HTTP port instead)."""

    # Off by default: `up` may run several runners on one machine; deployments set a port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


class TopologySettings(BaseSettings):
    """Stream-topology tuning every service applies when it declares the topology.

    `VISIONYARD_TOPOLOGY_ACK_WAITS='{"tracker": 5, "runner": 4}'` sets consumers' ack waits (seconds)
    by durable name: how long a message a crashed consumer had fetched waits before redelivery.
    Give every service the same value; a service without it keeps whatever the consumer has.
    """

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_TOPOLOGY_", extra="ignore")

    ack_waits: dict[str, float] = {}
    # How long a service waits for JetStream to answer its declarations at start-up (a cluster electing
    # its meta leader, a lost quorum coming back, a loaded machine) before it gives up and exits.
    declare_patience: float = Field(default=120.0, gt=0)
