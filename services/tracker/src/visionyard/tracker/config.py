"""Settings of the tracker service (env prefix `VISIONYARD_TRACKER_`)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from visionyard.shared.config import MetricsSettings, ServiceSettings


class TrackerSettings(ServiceSettings, MetricsSettings):
    """Where MLflow lives and how events are batched into it.

    `tracking_uri` defaults to a SQLite store under the data dir. SQLite allows ONE writer
    ("database is locked" otherwise), so with the default store the tracker runs as exactly one
    replica; point it at an MLflow tracking server to run several.
    """

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_TRACKER_", extra="ignore")

    tracking_uri: str | None = None
    artifact_root: str | None = None
    batch_size: int = 500
    # A partial batch waits this long for more events before it is written: each MLflow write costs
    # the same whether it carries one point or a thousand (profiled ~10-25 ms of CPU), so a job
    # reporting every half second costs one write per second instead of two. MLflow lags by at most this.
    linger_seconds: float = Field(default=1.0, ge=0, le=30)
    experiment_prefix: str = ""

    @model_validator(mode="after")
    def _derive_defaults(self) -> TrackerSettings:
        # A local SQLite or file store holds one writer and lives on one disk: in production that is
        # one tracker replica whose metrics die with its volume. Production names a tracking server
        # (http[s]://) or a server database (postgresql://, mysql://).
        if self.mode == "production" and (self.tracking_uri is None or _is_local_store(self.tracking_uri)):
            raise ValueError(
                "production mode refuses a local MLflow store "
                f"({self.tracking_uri or 'the default SQLite file under the data dir'}): set "
                "VISIONYARD_TRACKER_TRACKING_URI to an MLflow tracking server (http(s)://...) or a server database"
            )
        # The local defaults hang off the data dir; with a tracking server (http[s]://) the
        # server owns the artifact root unless one is given explicitly.
        if self.tracking_uri is None:
            database = (self.data_dir / "mlflow" / "mlflow.db").resolve()
            self.tracking_uri = f"sqlite:///{database}"
            if self.artifact_root is None:
                self.artifact_root = str((self.data_dir / "mlflow" / "artifacts").resolve())
        elif self.artifact_root is None and self.tracking_uri.startswith("sqlite:"):
            self.artifact_root = str((self.data_dir / "mlflow" / "artifacts").resolve())
        return self

    @property
    def mlflow_uri(self) -> str:
        """The resolved MLflow tracking URI."""
        assert self.tracking_uri is not None
        return self.tracking_uri


def _is_local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a store on this machine's disk (SQLite, a file store, a path)."""
    if "://" not in uri:
        # "sqlite:relative.db" or a bare path (a file store); only "databricks"/"uc" name a remote workspace.
        return uri.split(":", 1)[0].lower() not in ("databricks", "databricks-uc", "uc")
    scheme = uri.split("://", 1)[0].lower()
    return scheme in ("file", "sqlite") or scheme.startswith("sqlite+")
