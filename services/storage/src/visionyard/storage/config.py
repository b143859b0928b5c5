"""Settings of the storage service (env prefix `VISIONYARD_STORAGE_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from visionyard.shared.config import MetricsSettings, ServiceSettings

GIB = 1024**3


class StorageSettings(ServiceSettings, MetricsSettings):
    """Where stored files live (a local directory or S3) and the limits an uploaded archive must meet."""

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_STORAGE_", extra="ignore")

    backend: Literal["local", "s3"] = "local"
    root: Path | None = None
    external_bucket: str = "visionyard-external"
    internal_bucket: str = "visionyard-internal"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    create_buckets: bool | None = None
    max_upload_bytes: int = 2 * GIB
    max_uncompressed_bytes: int = 8 * GIB
    max_compression_ratio: float = 200.0
    max_files: int = 200_000
    # Production: S3 credentials come from these settings unless this says boto3's own chain provides
    # them (an IAM role, IRSA, an instance profile).
    s3_credentials_from_environment: bool = False

    @model_validator(mode="after")
    def _derive_defaults(self) -> StorageSettings:
        # Defaults that depend on other fields: the root sits in the data dir, and buckets are only
        # created automatically in embedded mode (production buckets are provisioned, with policies).
        if self.root is None:
            self.root = self.data_dir / "storage"
        if self.create_buckets is None:
            self.create_buckets = self.mode == "embedded"
        if self.mode == "production":
            self._refuse_unsafe_production()
        return self

    def _refuse_unsafe_production(self) -> None:
        # A local directory is one pod's disk: replicas would not see each other's files and a
        # rescheduled pod loses them.
        if self.backend != "s3":
            raise ValueError("production mode refuses the local-directory backend: set VISIONYARD_STORAGE_BACKEND=s3 "
                             "(with VISIONYARD_STORAGE_S3_ENDPOINT_URL for MinIO/R2)")
        has_keys = self.s3_access_key_id is not None and self.s3_secret_access_key is not None
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError("production mode needs both VISIONYARD_STORAGE_S3_ACCESS_KEY_ID and "
                             "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY, not one of them")
        if not has_keys and not self.s3_credentials_from_environment:
            raise ValueError("production mode refuses S3 without credentials: set VISIONYARD_STORAGE_S3_ACCESS_KEY_ID "
                             "and VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY, or VISIONYARD_STORAGE_S3_CREDENTIALS_FROM_"
                             "ENVIRONMENT=true when an IAM role provides them")

    @property
    def storage_root(self) -> Path:
        """The local backend's root directory."""
        assert self.root is not None
        return self.root

    @property
    def work_dir(self) -> Path:
        """Scratch space for downloads and archive checks (on disk, never whole archives in memory)."""
        return self.data_dir / "tmp" / "storage"
