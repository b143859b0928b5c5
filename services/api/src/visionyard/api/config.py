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
    # How long a request that waits for an inference job (the test panel's quick path, a deployment's
    # endpoint) waits for a runner to answer before it cancels the job and answers 504.
    inference_wait_seconds: float = Field(default=120.0, gt=0)
    # Attempts a job gets in all when infrastructure loses them (only those failures are retried).
    max_attempts: int = Field(default=3, ge=1)
    # uvicorn's `--loop`: "auto" runs on uvloop when it is installed (it is, with uvicorn[standard]).
    # Measured on the event pipeline (alternating runs): ~9 % less API CPU per event than asyncio's loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Whether this replica stands for the scheduler lease (docs/scheduling.md); at least one replica must.
    scheduler: bool = True
    # While slots turn over fast (short jobs), admit up to this many seconds of turnover ahead of a free slot
    # (at most one job per runner), so runners do not wait a scheduler round trip between jobs; 0: never.
    scheduler_lookahead_seconds: float = Field(default=0.5, ge=0, le=10)

    # -- who may call (auth/) ------------------------------------------------------------------------
    # Calls without credentials act as the admin: only for the one-person embedded install, whose
    # original frontend calls the training, WebSocket and inference routes without a token.
    # Always off in production. Off in embedded mode too when set false (then every call needs a token).
    anonymous_as_admin: bool | None = None
    # HS256 key for access and refresh tokens; embedded mode generates one under data_dir.
    jwt_secret: str = ""
    access_token_minutes: int = Field(default=30, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=7, ge=1, le=90)
    # The first admin, created at start-up when the database has no user yet.
    admin_email: str = ""
    admin_password: str = ""
    # Self-service sign-up: on in embedded mode unless set false; off in production unless set true.
    open_registration: bool | None = None
    # Browser origins allowed by CORS. Embedded default: any loopback origin (http://localhost:*,
    # http://127.0.0.1:*); production: exactly this list (empty = no cross-origin browser access).
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("api_keys", "cors_origins", mode="before")
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
        embedded = self.mode == "embedded"
        if self.anonymous_as_admin is None:
            self.anonymous_as_admin = embedded
        if self.open_registration is None:
            self.open_registration = embedded
        if not embedded:
            # An unauthenticated API is only acceptable for the single local user of the embedded mode.
            if self.anonymous_as_admin:
                raise ValueError("anonymous_as_admin: not allowed in production mode (every call must authenticate)")
            if len(self.jwt_secret) < 32:
                raise ValueError(
                    "jwt_secret: production mode requires VISIONYARD_API_JWT_SECRET of at least 32 characters; "
                    "refusing to start without it"
                )
        if (self.admin_email or self.admin_password) and not (self.admin_email and "@" in self.admin_email
                                                                and len(self.admin_password) >= 8):
            raise ValueError("admin_email/admin_password: give an email and a password of at least 8 characters")
        return self

    def allows_origin_regex(self) -> str | None:
        """The CORS origin pattern of the embedded default (any loopback port), or None for an explicit list."""
        if self.cors_origins or self.mode != "embedded":
            return None
        return r"http://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
