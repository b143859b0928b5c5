"""Upload a dataset (a zip, or a folder zipped on the fly) and wait until storage accepts or rejects it."""

from __future__ import annotations

import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionyard.cli.client import ApiClient

READY_STATUSES = frozenset({"ready"})
REJECTED_STATUSES = frozenset({"rejected", "failed", "error"})
_REASON_KEYS = ("reason", "rejection_reason", "rejected_reason", "error_message", "error", "status_message")


@dataclass(frozen=True)
class UploadOutcome:
    """The dataset after ingestion: ready (with its stats) or rejected (with the reason)."""

    dataset_id: str
    status: str
    dataset: dict[str, Any]

    @property
    def ready(self) -> bool:
        """Whether storage accepted the dataset."""
        return self.status in READY_STATUSES

    @property
    def reason(self) -> str:
        """Why it was rejected ('' when it was not)."""
        for key in _REASON_KEYS:
            if self.dataset.get(key):
                return str(self.dataset[key])
        return "no reason given"


@contextmanager
def zipped(path: Path) -> Iterator[Path]:
    """`path` itself if it is a file; a folder is zipped to a temporary file removed afterwards."""
    if path.is_file():
        yield path
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a zip file nor a folder")
    with tempfile.TemporaryDirectory(prefix="visionyard-upload-") as scratch:
        archive_path = Path(scratch) / f"{path.name or 'dataset'}.zip"
        with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(path.rglob("*")):
                # Links are skipped: storage rejects them anyway, and following one could leak files.
                if file.is_file() and not file.is_symlink():
                    archive.write(file, file.relative_to(path).as_posix())
        yield archive_path


def wait_for_dataset(client: ApiClient, dataset_id: str, *, timeout: float = 300.0,
                     poll_interval: float = 0.5) -> UploadOutcome:
    """Poll GET /datasets/{id} until it is ready or rejected (TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        dataset = client.get_dataset(dataset_id)
        status = str(dataset.get("status", "")).lower()
        if status in READY_STATUSES or status in REJECTED_STATUSES:
            return UploadOutcome(dataset_id=dataset_id, status=status, dataset=dataset)
        if time.monotonic() > deadline:
            raise TimeoutError(f"dataset {dataset_id} still '{status}' after {timeout:.0f}s")
        time.sleep(poll_interval)


def upload_dataset(client: ApiClient, path: Path, *, name: str, description: str | None = None,
                   timeout: float = 300.0, poll_interval: float = 0.5) -> UploadOutcome:
    """Create a dataset, upload `path` (zip or folder) to it and wait for the verdict."""
    with zipped(Path(path)) as archive:
        dataset_id = client.create_dataset(name=name, description=description)
        client.upload_dataset_zip(dataset_id, archive)
    return wait_for_dataset(client, dataset_id, timeout=timeout, poll_interval=poll_interval)


def describe_dataset(dataset: dict[str, Any]) -> str:
    """A few lines of statistics for a ready dataset."""
    images = dataset.get("num_images", dataset.get("num_items"))
    classes = dataset.get("class_names") or []
    lines = [
        f"dataset {dataset.get('id')} '{dataset.get('name')}' is {dataset.get('status')}",
        f"  format: {dataset.get('format')}  images: {images}  classes: {dataset.get('num_classes')}",
    ]
    if classes:
        lines.append(f"  class names: {', '.join(str(name) for name in classes)}")
    if dataset.get("size_mb") is not None:
        lines.append(f"  size: {dataset['size_mb']} MB  content hash: {dataset.get('content_hash')}")
    return "\n".join(lines)
