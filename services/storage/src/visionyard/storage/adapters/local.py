"""Object backend on a local directory: `<root>/<bucket>/<key>`, URIs `file:///abs/path`.

The embedded mode's stand-in for S3. Every write goes to a temporary file beside the target and is
renamed into place, so a reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse


class LocalDirectoryBackend:
    """Buckets as directories under one root."""

    # `file://` URIs are no use to a browser: the API serves image bytes it asks storage for.
    presigns_urls = False

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def ensure_buckets(self, buckets: list[str]) -> None:
        """Create the bucket directories."""
        for bucket in buckets:
            self._bucket_dir(bucket).mkdir(parents=True, exist_ok=True)

    def uri(self, bucket: str, key: str) -> str:
        """`file://` URI of an object."""
        return self._path(bucket, key).as_uri()

    def parse_uri(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of a `file://` URI under the root."""
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ValueError(f"not a file:// URI of this store: {uri}")
        path = Path(unquote(parsed.path)).resolve()
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            raise ValueError(f"{uri} is outside the storage root") from None
        parts = relative.parts
        if len(parts) < 2:
            raise ValueError(f"{uri} names no object")
        return parts[0], "/".join(parts[1:])

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        """Copy a file in atomically."""
        target = self._path(bucket, key)
        partial = self._partial(target)
        try:
            with path.open("rb") as source, partial.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
                sink.flush()
                os.fsync(sink.fileno())
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target.as_uri()

    def begin_upload(self, bucket: str, key: str) -> PartialFileUpload:
        """Write into a hidden partial file, renamed into place on `complete`.

        The partial lives in the bucket's hidden `.uploads/` folder (same file system, so the rename
        is atomic) rather than beside the target: an aborted upload leaves not even a folder behind.
        """
        target = self._path(bucket, key, create=False)
        uploads = self._bucket_dir(bucket) / ".uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        return PartialFileUpload(target, uploads / f"{uuid.uuid4().hex}.partial")

    def get_file(self, bucket: str, key: str, destination: Path) -> Path:
        """Copy an object out (atomically at the destination)."""
        source = self._path(bucket, key, create=False)
        if not source.is_file():
            raise FileNotFoundError(f"{bucket}/{key}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = self._partial(destination)
        try:
            shutil.copyfile(source, partial)
            partial.replace(destination)
        finally:
            partial.unlink(missing_ok=True)
        return destination

    def exists(self, bucket: str, key: str) -> bool:
        """Whether the object's file exists."""
        return self._path(bucket, key, create=False).is_file()

    def read_bytes(self, bucket: str, key: str) -> bytes | None:
        """A small object's bytes, or None."""
        path = self._path(bucket, key, create=False)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, bucket: str, key: str, data: bytes) -> str:
        """Write a small object atomically."""
        target = self._path(bucket, key)
        partial = self._partial(target)
        try:
            with partial.open("wb") as sink:
                sink.write(data)
                sink.flush()
                os.fsync(sink.fileno())
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target.as_uri()

    def sha256(self, bucket: str, key: str) -> str | None:
        """Hex sha256 of the stored file, or None."""
        path = self._path(bucket, key, create=False)
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def presign(self, uri: str, *, expires_in: int) -> str:
        """The local store has no server: the `file://` URI itself, after checking it is ours."""
        bucket, key = self.parse_uri(uri)
        if not self.exists(bucket, key):
            raise FileNotFoundError(uri)
        return self.uri(bucket, key)

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every file under `prefix` (and the folders it leaves empty)."""
        base = self._bucket_dir(bucket)
        # Walk only the folder the prefix lies in (`datasets/<id>/<hash>/`), not the whole bucket.
        folder_prefix = prefix.endswith("/") and bool(prefix.strip("/"))
        parent = prefix.strip("/") if folder_prefix else prefix.rpartition("/")[0]
        top = self._path(bucket, parent, create=False) if parent else base
        if not top.is_dir():
            return 0
        deleted = 0
        # Deepest first, so a folder is emptied before it is looked at.
        for path in sorted(top.rglob("*"), reverse=True):
            relative = path.relative_to(base).as_posix()
            if not relative.startswith(prefix):
                continue
            if path.is_file() or path.is_symlink():
                path.unlink()
                deleted += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if folder_prefix and not any(top.iterdir()):
            top.rmdir()
        return deleted

    def list_folders(self, bucket: str, prefix: str) -> list[str]:
        """Names of the folders directly under `prefix` (a `/`-terminated key prefix)."""
        if not prefix.strip("/"):
            folder = self._bucket_dir(bucket)
        else:
            folder = self._path(bucket, prefix.strip("/"), create=False)
        if not folder.is_dir():
            return []
        # Hidden names are our own partial writes, never objects.
        return sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))

    def _bucket_dir(self, bucket: str) -> Path:
        if not bucket or "/" in bucket or bucket in (".", ".."):
            raise ValueError(f"invalid bucket name {bucket!r}")
        return self.root / bucket

    def _path(self, bucket: str, key: str, *, create: bool = True) -> Path:
        base = self._bucket_dir(bucket)
        # Keys are built from ids in messages: refuse anything that would leave the bucket.
        parts = key.split("/")
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"invalid object key {key!r}")
        path = base.joinpath(*parts)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _partial(target: Path) -> Path:
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")


class PartialFileUpload:
    """An object being written to a partial file; `complete` fsyncs and renames it into place."""

    def __init__(self, target: Path, partial: Path) -> None:
        self.target = target
        self.partial = partial
        self._sink: BinaryIO | None = partial.open("wb")

    def write(self, data: bytes) -> None:
        """Append to the partial file."""
        if self._sink is None:
            raise ValueError(f"upload of {self.target} is already finished")
        self._sink.write(data)

    def complete(self) -> str:
        """Flush, fsync and rename into place; returns the object's URI."""
        if self._sink is None:
            raise ValueError(f"upload of {self.target} is already finished")
        try:
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self._sink.close()
            self._sink = None
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.partial.replace(self.target)
        except BaseException:
            self.abort()
            raise
        return self.target.as_uri()

    def abort(self) -> None:
        """Close and remove the partial file (idempotent)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self.partial.unlink(missing_ok=True)
