"""One contract, two object backends: the local directory and S3 (a real moto_server endpoint)."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid
from pathlib import Path

import pytest

from visionyard.storage.adapters.local import LocalDirectoryBackend
from visionyard.storage.adapters.s3 import S3Backend
from visionyard.storage.ports import ObjectBackend

pytestmark = pytest.mark.integration


def s3_backend(endpoint: str) -> S3Backend:
    """An S3 backend on the moto endpoint with its fake credentials."""
    return S3Backend(endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing")


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectBackend, str]:
    """Each backend with a fresh bucket."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    chosen: ObjectBackend
    if request.param == "local":
        chosen = LocalDirectoryBackend(tmp_path / "root")
    else:
        chosen = s3_backend(request.getfixturevalue("s3_endpoint"))
    chosen.ensure_buckets([bucket])
    chosen.ensure_buckets([bucket])  # idempotent
    return chosen, bucket


def test_put_get_exists_and_uri(backend, tmp_path: Path) -> None:
    store, bucket = backend
    source = tmp_path / "ckpt.pt"
    source.write_bytes(b"weights" * 50_000)
    assert not store.exists(bucket, "checkpoints/j/best.pt")
    uri = store.put_file(bucket, "checkpoints/j/best.pt", source)
    assert store.parse_uri(uri) == (bucket, "checkpoints/j/best.pt")
    assert store.exists(bucket, "checkpoints/j/best.pt")
    copy = store.get_file(bucket, "checkpoints/j/best.pt", tmp_path / "out" / "copy.pt")
    assert copy.read_bytes() == source.read_bytes()
    assert store.sha256(bucket, "checkpoints/j/best.pt") == hashlib.sha256(source.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        store.get_file(bucket, "checkpoints/j/none.pt", tmp_path / "none.pt")
    assert store.sha256(bucket, "checkpoints/j/none.pt") is None


def test_small_objects_round_trip_and_overwrite(backend) -> None:
    store, bucket = backend
    assert store.read_bytes(bucket, "checkpoints/j/best.json") is None
    store.write_bytes(bucket, "checkpoints/j/best.json", b'{"seq": 1}')
    store.write_bytes(bucket, "checkpoints/j/best.json", b'{"seq": 2}')
    assert store.read_bytes(bucket, "checkpoints/j/best.json") == b'{"seq": 2}'


def test_presigned_url_serves_the_object(backend, tmp_path: Path) -> None:
    store, bucket = backend
    source = tmp_path / "dataset.zip"
    source.write_bytes(bytes(range(256)) * 1000)
    uri = store.put_file(bucket, "datasets/d/h/dataset.zip", source)
    url = store.presign(uri, expires_in=300)
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.read() == source.read_bytes()


def test_delete_prefix_removes_only_that_prefix(backend) -> None:
    store, bucket = backend
    for key in ("datasets/a/1/dataset.zip", "datasets/a/1/manifest.json", "datasets/b/1/dataset.zip"):
        store.write_bytes(bucket, key, b"x")
    assert store.delete_prefix(bucket, "datasets/a/") == 2
    assert not store.exists(bucket, "datasets/a/1/dataset.zip")
    assert store.exists(bucket, "datasets/b/1/dataset.zip")


def pending_uploads(store: ObjectBackend, bucket: str) -> int:
    """Uploads begun but neither completed nor aborted: S3 multipart uploads, local partial files."""
    if isinstance(store, S3Backend):
        return len(store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    assert isinstance(store, LocalDirectoryBackend)
    return len(list((store.root / bucket / ".uploads").glob("*")))


def stream_into(store: ObjectBackend, bucket: str, key: str, data: bytes, *, chunk: int = 1 << 20):  # type: ignore[no-untyped-def]
    upload = store.begin_upload(bucket, key)
    for start in range(0, len(data), chunk):
        upload.write(data[start : start + chunk])
    return upload


def test_streamed_upload_appears_only_when_completed(backend) -> None:
    store, bucket = backend
    data = os.urandom(40 * 1024 * 1024 + 123)  # on S3: three parts, the last one short
    upload = stream_into(store, bucket, "checkpoints/j/last.pt", data)
    assert not store.exists(bucket, "checkpoints/j/last.pt")
    uri = upload.complete()
    upload.abort()  # after completion: nothing to undo
    assert store.parse_uri(uri) == (bucket, "checkpoints/j/last.pt")
    assert store.sha256(bucket, "checkpoints/j/last.pt") == hashlib.sha256(data).hexdigest()
    small = stream_into(store, bucket, "checkpoints/j/best.pt", b"tiny weights")
    small.complete()
    assert store.read_bytes(bucket, "checkpoints/j/best.pt") == b"tiny weights"
    assert pending_uploads(store, bucket) == 0


def test_aborted_upload_leaves_the_previous_object_and_nothing_pending(backend) -> None:
    store, bucket = backend
    store.write_bytes(bucket, "checkpoints/j/best.pt", b"the stored one")
    upload = stream_into(store, bucket, "checkpoints/j/best.pt", os.urandom(20 * 1024 * 1024))
    upload.abort()
    upload.abort()  # idempotent
    assert store.read_bytes(bucket, "checkpoints/j/best.pt") == b"the stored one"
    assert pending_uploads(store, bucket) == 0
    never = stream_into(store, bucket, "checkpoints/k/best.pt", b"x" * 1000)
    never.abort()
    assert not store.exists(bucket, "checkpoints/k/best.pt")
    assert store.list_folders(bucket, "checkpoints/") == ["j"]  # not even a folder for k


def test_buckets_it_creates_abort_incomplete_multipart_uploads(s3_endpoint: str) -> None:
    # A storage process killed mid-upload must not leave invisible parts behind for ever.
    store = s3_backend(s3_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    store.ensure_buckets([bucket])
    rules = store.client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for rule in rules] == [1]


def test_local_backend_refuses_keys_and_uris_outside_its_root(tmp_path: Path) -> None:
    store = LocalDirectoryBackend(tmp_path / "root")
    with pytest.raises(ValueError):
        store.write_bytes("b", "../../escape", b"x")
    with pytest.raises(ValueError):
        store.parse_uri((tmp_path / "elsewhere" / "x").as_uri())
    assert not (tmp_path / "escape").exists()


def test_every_s3_call_is_timed_by_operation_and_outcome(s3_endpoint: str) -> None:
    from prometheus_client import REGISTRY

    def calls(operation: str, outcome: str) -> float:
        labels = {"operation": operation, "outcome": outcome}
        return REGISTRY.get_sample_value("visionyard_storage_s3_seconds_count", labels) or 0.0

    backend = s3_backend(s3_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    backend.ensure_buckets([bucket])
    puts, misses = calls("PutObject", "ok"), calls("HeadObject", "error")
    backend.write_bytes(bucket, "timed/object", b"payload")
    assert not backend.exists(bucket, "timed/missing")  # a 404 is an answer, counted as an error outcome
    assert calls("PutObject", "ok") == puts + 1
    assert calls("HeadObject", "error") == misses + 1
