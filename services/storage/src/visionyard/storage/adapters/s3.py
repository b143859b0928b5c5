"""Object backend on S3 (or any S3-compatible store: MinIO, R2, moto) through boto3.

This is the only module that holds S3 credentials. Large files go up with multipart uploads; S3
makes a completed PutObject/multipart upload visible atomically, so readers never see half a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

_MIB = 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


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
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
        )
        # 16 MiB parts sent 8 at a time: a 200 MB checkpoint goes up as 13 parallel parts instead of 4.
        self.transfer = TransferConfig(multipart_threshold=16 * _MIB, multipart_chunksize=16 * _MIB, max_concurrency=8)

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
        """Upload a file (multipart above 64 MiB)."""
        self.client.upload_file(str(path), bucket, key, Config=self.transfer)
        return self.uri(bucket, key)

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


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
