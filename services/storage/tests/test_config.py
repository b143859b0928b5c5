"""Storage settings: production refuses the local-directory backend and S3 without credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from visionyard.storage.config import StorageSettings

NATS = "nats://storage:secret@127.0.0.1:4222"


def _production(tmp_path: Path, **options: Any) -> StorageSettings:
    return StorageSettings(mode="production", nats_url=NATS, data_dir=tmp_path, **options)


def test_production_refuses_the_local_directory_backend(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="local-directory backend.*VISIONYARD_STORAGE_BACKEND=s3"):
        _production(tmp_path)


def test_production_refuses_s3_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="S3 without credentials"):
        _production(tmp_path, backend="s3")
    with pytest.raises(ValidationError, match="not one of them"):
        _production(tmp_path, backend="s3", s3_access_key_id="key")


def test_production_accepts_s3_with_keys_or_an_iam_role(tmp_path: Path) -> None:
    settings = _production(tmp_path, backend="s3", s3_access_key_id="key", s3_secret_access_key="secret")
    assert settings.create_buckets is False  # production buckets are provisioned
    assert _production(tmp_path, backend="s3", s3_credentials_from_environment=True).backend == "s3"


def test_production_refuses_an_open_nats(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="VISIONYARD_STORAGE_NATS_URL"):
        StorageSettings(mode="production", backend="s3", s3_credentials_from_environment=True, data_dir=tmp_path)


def test_embedded_mode_keeps_the_local_directory(tmp_path: Path) -> None:
    assert StorageSettings(data_dir=tmp_path).backend == "local"
