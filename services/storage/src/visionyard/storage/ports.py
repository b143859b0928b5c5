"""The small ports the storage use cases need: a bucket backend, the staging area and a publisher."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from visionyard.shared.messages import Message


class ObjectUpload(Protocol):
    """An object being written to a backend; nothing is visible under its key until `complete`.

    Calls are blocking, like the backend's.
    """

    def write(self, data: bytes) -> None:
        """Append bytes (blocks while the backend is behind, so memory stays bounded)."""

    def complete(self) -> str:
        """Make the object visible under its key, atomically; returns its URI."""

    def abort(self) -> None:
        """Discard what was written (idempotent); the key keeps whatever it held before."""


class ObjectBackend(Protocol):
    """Buckets of files addressed by (bucket, key); local directory or S3 behind the same calls.

    Calls are blocking (boto3 and file I/O); the use cases run them in a worker thread.
    """

    presigns_urls: bool  # whether `presign` gives a URL a browser can fetch (S3) or not (local files)

    def ensure_buckets(self, buckets: list[str]) -> None:
        """Create the buckets that do not exist yet."""

    def uri(self, bucket: str, key: str) -> str:
        """The URI of an object (`s3://bucket/key` or `file:///abs/path`)."""

    def parse_uri(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of a URI this backend issued; `ValueError` for anything else."""

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        """Store a local file (atomically: readers see the old or the new object); returns its URI."""

    def begin_upload(self, bucket: str, key: str) -> ObjectUpload:
        """Start writing an object from a stream of bytes (a staged checkpoint as it is read)."""

    def get_file(self, bucket: str, key: str, destination: Path) -> Path:
        """Copy an object to a local file; `FileNotFoundError` when it does not exist."""

    def exists(self, bucket: str, key: str) -> bool:
        """Whether the object exists."""

    def read_bytes(self, bucket: str, key: str) -> bytes | None:
        """A small object's bytes (JSON sidecars), or None when it does not exist."""

    def write_bytes(self, bucket: str, key: str, data: bytes) -> str:
        """Store a small object atomically; returns its URI."""

    def sha256(self, bucket: str, key: str) -> str | None:
        """Hex sha256 of an object, read back from the backend, or None when it does not exist."""

    def presign(self, uri: str, *, expires_in: int) -> str:
        """A URL a client can download the object from."""

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many."""

    def list_folders(self, bucket: str, prefix: str) -> list[str]:
        """Names of the "folders" directly under a `/`-terminated prefix (e.g. a dataset's versions)."""


@dataclass(frozen=True)
class StagedObject:
    """An object in the staging object store."""

    name: str
    sha256: str
    size_bytes: int


class StagedObjectMissing(Exception):
    """The staged object is gone (its TTL passed, or it never existed)."""


class StagedObjectCorrupt(Exception):
    """The staged object's bytes do not match the sha256 its producer announced."""


class StagingArea(Protocol):
    """The staging object store through which files cross service boundaries."""

    async def fetch(self, name: str, destination: Path, *, sha256: str) -> Path:
        """Copy a staged object to a local file, verifying its sha256."""

    def read(self, name: str, *, sha256: str) -> AsyncGenerator[bytes, None]:
        """A staged object's bytes, chunk by chunk; `StagedObjectCorrupt` instead of the end of the
        iteration when they do not hash to `sha256`, so a consumer that only commits after the last
        chunk never commits other bytes. `StagedObjectMissing` when it is gone."""

    def read_incoming(self, object_id: str, size: int) -> AsyncGenerator[bytes, None]:
        """The bytes of an object still being put under `object_id`, as they are stored, until `size`
        have come; unverified (the caller checks them against the object's sha256 before keeping them)."""

    async def stage(self, name: str, path: Path) -> StagedObject:
        """Put a local file into the staging object store."""

    async def info(self, name: str) -> StagedObject | None:
        """What is staged under `name`, or None."""


class EventPublisher(Protocol):
    """Publishes an event durably, de-duplicated by its message id."""

    async def publish(self, message: Message) -> Any:
        """Publish and await the broker's acknowledgement."""
