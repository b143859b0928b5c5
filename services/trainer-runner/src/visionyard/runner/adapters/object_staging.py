"""Fetching stored objects by URI from storage (`storage.stage_object`) through the object store."""

from __future__ import annotations

from pathlib import Path

from visionyard.shared import subjects
from visionyard.shared.bus import Bus, PermanentError
from visionyard.shared.requests import StageObjectRequest, StageReply


class BusObjectStager:
    """Asks storage to stage an object by URI, then fetches it verified by sha256."""

    def __init__(self, bus: Bus, *, request_timeout: float = 60.0) -> None:
        self._bus = bus
        self._timeout = request_timeout

    async def stage_object(self, uri: str, destination: Path) -> Path:
        """The object at `uri` at `destination`; `PermanentError` when storage has no such object."""
        raw = await self._bus.request(subjects.STORAGE_STAGE_OBJECT, StageObjectRequest(uri=uri), timeout=self._timeout)
        reply = StageReply.model_validate_json(raw)
        if not reply.ok or not reply.object_name:
            raise PermanentError(f"storage cannot stage {uri}: {reply.error}")
        return await self._bus.get_file(reply.object_name, destination, sha256=reply.sha256)
