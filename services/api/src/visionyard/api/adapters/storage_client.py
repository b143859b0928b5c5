"""The API's requests to the storage service: presigned URLs, fetching stored objects, keeping uploads."""

from __future__ import annotations

from pathlib import Path

from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.requests import (
    KeepUploadReply,
    KeepUploadRequest,
    PresignReply,
    PresignRequest,
    StageObjectRequest,
    StageReply,
)


class BusStorageClient:
    """Request-reply to storage; files come back through the staging object store."""

    def __init__(self, bus: Bus, *, timeout: float = 30.0) -> None:
        self._bus = bus
        self._timeout = timeout

    async def presign(self, uri: str, *, expires_in: int) -> str:
        """A download URL for a stored object."""
        raw = await self._bus.request(subjects.STORAGE_PRESIGN, PresignRequest(uri=uri, expires_in=expires_in),
                                      timeout=self._timeout)
        reply = PresignReply.model_validate_json(raw)
        if not reply.ok or not reply.url:
            raise RuntimeError(reply.error or "presign refused")
        return reply.url

    async def fetch(self, uri: str, destination: Path) -> Path:
        """The stored object at `destination`, verified by sha256."""
        raw = await self._bus.request(subjects.STORAGE_STAGE_OBJECT, StageObjectRequest(uri=uri), timeout=self._timeout)
        reply = StageReply.model_validate_json(raw)
        if not reply.ok or not reply.object_name:
            raise RuntimeError(reply.error or "stage refused")
        return await self._bus.get_file(reply.object_name, destination, sha256=reply.sha256)

    async def keep_upload(self, *, session_id: str, filename: str, path: Path) -> KeepUploadReply:
        """Stage an uploaded file and ask storage to keep it under the inference session."""
        object_name = f"upload/inference/{session_id}/{path.name}"
        sha256, _ = await self._bus.put_file(object_name, path)
        request = KeepUploadRequest(session_id=session_id, filename=filename, object_name=object_name, sha256=sha256)
        raw = await self._bus.request(subjects.STORAGE_KEEP_UPLOAD, request, timeout=self._timeout)
        return KeepUploadReply.model_validate_json(raw)
