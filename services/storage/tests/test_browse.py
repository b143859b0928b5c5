"""Ingesting every format through the use case, then browsing a version's images on both backends.

On S3 (a real moto endpoint) each image comes with a presigned URL that downloads the image's bytes;
on the local backend there is no URL and storage hands out the bytes (capped) instead.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.request
import uuid
from pathlib import Path

import pytest

from visionyard.shared.commands import IngestDataset
from visionyard.shared.events import DatasetReady, DatasetRejected
from visionyard.shared.requests import ListImagesRequest, ReadImageRequest
from visionyard.storage.adapters.local import LocalDirectoryBackend
from visionyard.storage.adapters.s3 import S3Backend
from visionyard.storage.ports import ObjectBackend
from visionyard.storage.service import Buckets, StorageService

from .corpus import coco_dataset, dice_dataset, yolo_dataset
from .test_service import FakePublisher, FakeStaging


def build(backend: ObjectBackend, tmp_path: Path, buckets: Buckets) -> tuple[StorageService, FakeStaging]:
    staging = FakeStaging()
    service = StorageService(
        backend=backend, staging=staging, publisher=FakePublisher(), workdir=tmp_path / "work", buckets=buckets
    )
    return service, staging


async def ingest(service: StorageService, staging: FakeStaging, data: bytes, *, dataset_id: str) -> DatasetReady | DatasetRejected:
    name = f"upload/{dataset_id}/{uuid.uuid4().hex}.zip"
    staging.objects[name] = data
    command = IngestDataset(
        dataset_id=dataset_id, object_name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
        filename="upload.zip",
    )
    event = await service.ingest_dataset(command)
    assert isinstance(event, (DatasetReady, DatasetRejected))
    return event


@pytest.mark.parametrize(
    ("entries", "fmt", "tasks"),
    [
        (yolo_dataset(), "yolo", ["object_detection"]),
        (coco_dataset(segmentation=True), "coco", ["object_detection", "instance_segmentation"]),
        (dice_dataset(), "dice", ["image_classification", "object_detection"]),
    ],
)
async def test_each_format_is_ingested_and_browsable_locally(make_zip, tmp_path: Path, entries, fmt, tasks) -> None:
    backend = LocalDirectoryBackend(tmp_path / "root")
    backend.ensure_buckets(["ext", "int"])
    service, staging = build(backend, tmp_path, Buckets("ext", "int"))
    ready = await ingest(service, staging, make_zip(entries).read_bytes(), dataset_id="ds1")
    assert isinstance(ready, DatasetReady), ready
    assert ready.format == fmt and ready.task_types == tasks and ready.num_annotations > 0

    page = await service.list_images(ListImagesRequest(dataset_id="ds1", content_hash=ready.content_hash, limit=2))
    assert page.ok and not page.presigned and page.total_images == ready.num_images
    assert len(page.images) == 2 and all(image.url is None for image in page.images)
    first = page.images[0]
    image = await service.read_image(
        ReadImageRequest(dataset_id="ds1", content_hash=ready.content_hash, filename=first.filename)
    )
    assert image.ok and image.content_type == "image/png"
    assert base64.b64decode(image.content_b64 or "") == dict(entries)[first.filename]

    missing = await service.read_image(
        ReadImageRequest(dataset_id="ds1", content_hash=ready.content_hash, filename="../manifest.json")
    )
    assert not missing.ok and missing.not_found
    too_big = await service.read_image(
        ReadImageRequest(dataset_id="ds1", content_hash=ready.content_hash, filename=first.filename, max_bytes=10)
    )
    assert not too_big.ok and "limited to 10" in (too_big.error or "")
    unknown = await service.list_images(ListImagesRequest(dataset_id="ds1", content_hash="e" * 64))
    assert not unknown.ok and unknown.not_found


@pytest.mark.integration
async def test_on_s3_images_come_with_presigned_urls_that_download_them(
    make_zip, tmp_path: Path, s3_endpoint: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    buckets = Buckets(external=f"ext-{suffix}", internal=f"int-{suffix}")
    backend = S3Backend(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    backend.ensure_buckets([buckets.external, buckets.internal])
    service, staging = build(backend, tmp_path, buckets)
    entries = yolo_dataset()
    ready = await ingest(service, staging, make_zip(entries).read_bytes(), dataset_id="ds2")
    assert isinstance(ready, DatasetReady) and ready.uri.startswith(f"s3://{buckets.external}/datasets/ds2/")

    page = await service.list_images(ListImagesRequest(dataset_id="ds2", content_hash=ready.content_hash))
    assert page.ok and page.presigned and page.total_images == 5
    for image in page.images:
        assert image.url is not None and image.url.startswith("http://127.0.0.1")
        with urllib.request.urlopen(image.url, timeout=10) as response:
            assert response.read() == dict(entries)[image.filename]
    one = await service.list_images(
        ListImagesRequest(dataset_id="ds2", content_hash=ready.content_hash, filename="images/val/val1.png")
    )
    assert one.ok and [image.filename for image in one.images] == ["images/val/val1.png"]
