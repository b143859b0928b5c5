"""Object backend on S3 (or any S3-compatible store: MinIO, R2, moto) through boto3.

This is the only module that holds S3 credentials. Large files go up with multipart uploads; S3
makes a completed PutObject/multipart upload visible atomically, so readers never see half a file.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from prometheus_client import Histogram

from visionyard.shared.metrics import LATENCY_BUCKETS

_MIB = 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# The AWS SDKs' default part size. 16 MiB parts (8 in flight) left up to 128 MB still to send when a
# streamed copy read its last byte; with 8 MiB parts the tail is half that (bench/PROFILE.md, round 4).
PART_SIZE = 8 * _MIB
_PARTS_IN_FLIGHT = 8


class S3Backend:
    """Buckets in S3; URIs `s3://bucket/key`."""

    # Presigned URLs are fetchable by a browser, so the API hands them out directly.
    presigns_urls = True

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client: Any = None,
    ) -> None:
        self.region = region
        # Without explicit keys boto3 falls back to its default chain (env, profile, instance role).
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            # Room for every part in flight plus the calls beside them (sidecars, HEADs).
            config=Config(
                signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=2 * _PARTS_IN_FLIGHT + 4,
            ),
        )
        _time_s3_calls(self.client)
        # 16 MiB parts sent 8 at a time: a 200 MB checkpoint goes up as 13 parallel parts instead of 4.
        self.transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=_PARTS_IN_FLIGHT
        )
        self._part_senders = ThreadPoolExecutor(max_workers=_PARTS_IN_FLIGHT, thread_name_prefix="s3-part")

    def ensure_buckets(self, buckets: list[str]) -> None:
        """Create missing buckets (embedded/dev only; production buckets are provisioned)."""
        for bucket in buckets:
            try:
                self.client.head_bucket(Bucket=bucket)
                continue
            except ClientError as error:
                if _code(error) not in _NOT_FOUND | {"NoSuchBucket"}:
                    raise
            options: dict[str, Any] = {"Bucket": bucket}
            if self.region != "us-east-1":
                options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(**options)
            except ClientError as error:
                if _code(error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            # A storage process killed mid-upload leaves an unfinished multipart upload: invisible, but
            # billed until aborted. Buckets provisioned elsewhere need the same rule.
            self.client.put_bucket_lifecycle_configuration(
                Bucket=bucket,
                LifecycleConfiguration={"Rules": [{
                    "ID": "visionyard-abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }]},
            )

    def uri(self, bucket: str, key: str) -> str:
        """`s3://bucket/key`."""
        return f"s3://{bucket}/{key}"

    def parse_uri(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of an `s3://` URI."""
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        if parsed.scheme != "s3" or not parsed.netloc or not key:
            raise ValueError(f"not an s3:// object URI: {uri}")
        return parsed.netloc, key

    def put_file(self, bucket: str, key: str, path: Path) -> str:
        """Upload a file (multipart above 16 MiB)."""
        self.client.upload_file(str(path), bucket, key, Config=self.transfer)
        return self.uri(bucket, key)

    def begin_upload(self, bucket: str, key: str) -> MultipartUpload:
        """A streamed upload: parts go up while later bytes are still arriving."""
        return MultipartUpload(self.client, bucket, key, uri=self.uri(bucket, key), senders=self._part_senders)

    def get_file(self, bucket: str, key: str, destination: Path) -> Path:
        """Download an object to a local file, renamed into place when complete."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        try:
            self.client.download_file(bucket, key, str(partial), Config=self.transfer)
        except ClientError as error:
            partial.unlink(missing_ok=True)
            if _code(error) in _NOT_FOUND:
                raise FileNotFoundError(f"s3://{bucket}/{key}") from error
            raise
        partial.replace(destination)
        return destination

    def exists(self, bucket: str, key: str) -> bool:
        """HEAD the object."""
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _code(error) in _NOT_FOUND:
                return False
            raise
        return True

    def read_bytes(self, bucket: str, key: str) -> bytes | None:
        """GET a small object."""
        try:
            reply = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _code(error) in _NOT_FOUND:
                return None
            raise
        body: bytes = reply["Body"].read()
        return body

    def write_bytes(self, bucket: str, key: str, data: bytes) -> str:
        """PUT a small object."""
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return self.uri(bucket, key)

    def sha256(self, bucket: str, key: str) -> str | None:
        """Stream the object back and hash it (proves what S3 holds, not what we sent)."""
        try:
            reply = self.client.get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _code(error) in _NOT_FOUND:
                return None
            raise
        digest = hashlib.sha256()
        for chunk in reply["Body"].iter_chunks(chunk_size=_MIB):
            digest.update(chunk)
        return digest.hexdigest()

    def presign(self, uri: str, *, expires_in: int) -> str:
        """A presigned GET URL."""
        bucket, key = self.parse_uri(uri)
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in
        )
        return url

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object under `prefix`, 1000 per request."""
        deleted = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted

    def list_folders(self, bucket: str, prefix: str) -> list[str]:
        """Names of the "folders" directly under `prefix` (common prefixes with delimiter `/`)."""
        folders: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                folders.append(str(common["Prefix"])[len(prefix):].rstrip("/"))
        return sorted(folders)


class MultipartUpload:
    """One object streamed into S3 as a multipart upload, each part carrying its CRC32.

    S3 rejects a part whose bytes do not match its CRC32 (BadDigest), and the completion names each
    part by its ETag and CRC32, so the completed object is exactly the bytes written here without
    reading it back (on S3 and stores that implement its checksums; moto, the test endpoint, does not).
    CRC32, AWS SDKs' default part checksum, guards each part on the wire; the object's SHA-256 is checked
    by the caller as the bytes pass. SHA-256 part checksums cost the sender and the endpoint a second and
    third SHA-256 pass over the object (the artifacts benchmark: ~0.5 s of CPU each for 200 MB).
    Until `complete` nothing is visible under the key; `abort` discards the parts. An object smaller
    than one part goes up as a single PutObject with its checksum.
    """

    def __init__(self, client: Any, bucket: str, key: str, *, uri: str, senders: ThreadPoolExecutor) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        self.uri = uri
        self._senders = senders
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._in_flight: collections.deque[Future[dict[str, Any]]] = collections.deque()
        self._parts: list[dict[str, Any]] = []
        self._finished = False

    def write(self, data: bytes) -> None:
        """Buffer bytes; every full part is sent in the background, at most 8 at a time."""
        self._buffer += data
        while len(self._buffer) >= PART_SIZE:
            with memoryview(self._buffer) as view:
                part = bytes(view[:PART_SIZE])
            del self._buffer[:PART_SIZE]
            self._send(part)

    def complete(self) -> str:
        """Send what is left, wait for every part, and complete the upload (or PutObject a small one)."""
        if self._upload_id is None:
            body = bytes(self._buffer)
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, ChecksumCRC32=_checksum(body))
        else:
            if self._buffer:
                self._send(bytes(self._buffer))
            while self._in_flight:
                self._parts.append(self._in_flight.popleft().result())
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
        self._buffer.clear()
        self._finished = True
        return self.uri

    def abort(self) -> None:
        """Stop sending parts and abort the multipart upload; nothing appears under the key."""
        self._buffer.clear()
        if self._finished or self._upload_id is None:
            return
        for future in self._in_flight:
            future.cancel()
        # A part still being sent when the upload is aborted could linger: wait for them first.
        for future in self._in_flight:
            if not future.cancelled():
                future.exception()
        self._in_flight.clear()
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
        self._finished = True

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            reply = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="CRC32")
            self._upload_id = str(reply["UploadId"])
        # Backpressure: the caller waits for the oldest part before an (N+1)th is held in memory.
        while len(self._in_flight) >= _PARTS_IN_FLIGHT:
            self._parts.append(self._in_flight.popleft().result())
        number = len(self._parts) + len(self._in_flight) + 1
        self._in_flight.append(self._senders.submit(self._send_part, number, part))

    def _send_part(self, number: int, part: bytes) -> dict[str, Any]:
        checksum = _checksum(part)
        reply = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=part,
            ChecksumAlgorithm="CRC32", ChecksumCRC32=checksum,
        )
        return {"PartNumber": number, "ETag": reply["ETag"], "ChecksumCRC32": checksum}


def _checksum(data: bytes) -> str:
    """The base64 CRC32 S3 checks a body against."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


S3_SECONDS = Histogram(
    "visionyard_storage_s3_seconds", "Time of storage's S3 API calls (retries included), by operation and outcome",
    ["operation", "outcome"], buckets=LATENCY_BUCKETS,
)


def _time_s3_calls(client: Any) -> None:
    """Time every S3 API call of `client` through botocore's own call events (no wrapper per call site)."""

    def started(model: Any, context: dict[str, Any], **_: Any) -> None:
        context["visionyard_call"] = (model.name, time.perf_counter())

    def answered(http_response: Any, context: dict[str, Any], **_: Any) -> None:
        # An error status (a 404 on a HEAD) is an answer too; only a call that got none raises below.
        _observe(context, "ok" if http_response.status_code < 300 else "error")

    def failed(context: dict[str, Any], **_: Any) -> None:
        _observe(context, "no_answer")

    client.meta.events.register("before-call.s3", started)
    client.meta.events.register("after-call.s3", answered)
    client.meta.events.register("after-call-error.s3", failed)


def _observe(context: dict[str, Any], outcome: str) -> None:
    call = context.pop("visionyard_call", None)
    if call is not None:
        operation, began = call
        S3_SECONDS.labels(operation, outcome).observe(time.perf_counter() - began)
