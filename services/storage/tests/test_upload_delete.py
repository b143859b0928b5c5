"""Deleting uploaded inference images the API released (`cmd.upload.delete`) on both backends: exactly the
named keys of the named session go, everything else stays, a key of another session is refused, and a
redelivered command changes nothing more."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from visionyard.shared.bus import PermanentError
from visionyard.shared.commands import DeleteUploads
from visionyard.shared.requests import KeepUploadRequest, StageObjectRequest
from visionyard.storage.export_inference import ExportInferenceStore
from visionyard.storage.ports import ObjectBackend
from visionyard.storage.service import Buckets, StorageService

from .conftest import png_bytes
from .test_dataset_delete import store  # noqa: F401  (the fixture: each backend with fresh buckets)
from .test_service import FakePublisher, FakeStaging


async def _keep(shipping: ExportInferenceStore, staging: FakeStaging, session_id: str, colour: int) -> tuple[str, str]:
    data = png_bytes((colour, 10, 10))
    name = f"upload/inference/{session_id}/{uuid.uuid4().hex}"
    staging.objects[name] = data
    reply = await shipping.keep_upload(KeepUploadRequest(session_id=session_id, filename="cat.png", object_name=name,
                                                         sha256=hashlib.sha256(data).hexdigest()))
    assert reply.ok and reply.key and reply.uri, reply
    return reply.key, reply.uri


async def test_only_the_named_images_of_the_session_are_deleted(
    store: tuple[ObjectBackend, Buckets], tmp_path: Path  # noqa: F811
) -> None:
    backend, buckets = store
    staging = FakeStaging()
    service = StorageService(backend=backend, staging=staging, publisher=FakePublisher(), workdir=tmp_path / "work",
                             buckets=buckets)
    shipping = ExportInferenceStore(service)
    first, first_uri = await _keep(shipping, staging, "session-a", 1)
    second, _ = await _keep(shipping, staging, "session-a", 2)
    other, _ = await _keep(shipping, staging, "session-b", 3)
    assert all(backend.exists(buckets.external, key) for key in (first, second, other))

    command = DeleteUploads(session_id="session-a", keys=[first])
    assert await shipping.delete_uploads(command) == 1
    assert not backend.exists(buckets.external, first)
    assert backend.exists(buckets.external, second) and backend.exists(buckets.external, other)
    # Gone for the runners too: an inference job naming it cannot stage it any more.
    staged = await shipping.stage_object(StageObjectRequest(uri=first_uri))
    assert not staged.ok and "no such object" in (staged.error or "")

    assert await shipping.delete_uploads(command) == 1  # redelivered: nothing left to delete, no error
    assert backend.exists(buckets.external, second)

    for refused in (DeleteUploads(session_id="session-a", keys=[other]),
                    DeleteUploads(session_id="session-a", keys=["inference/session-a/../session-b/x.png"]),
                    DeleteUploads(session_id="session-a", keys=["inference/session-a/"]),
                    DeleteUploads(session_id="../etc", keys=[])):
        with pytest.raises(PermanentError):
            await shipping.delete_uploads(refused)
    assert backend.exists(buckets.external, other) and backend.exists(buckets.external, second)
