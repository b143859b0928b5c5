"""Asks storage (request-reply) for a stored dataset version's images: a page of them, or one's bytes
(inline in the reply, or, for a big image, through the staging object store)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from nats.js.errors import NotFoundError
from pydantic import BaseModel, ValidationError

from visionyard.api.errors import Unavailable
from visionyard.shared import subjects
from visionyard.shared.bus import Bus, PermanentError, TransientError
from visionyard.shared.requests import ListImagesReply, ListImagesRequest, ReadImageReply, ReadImageRequest

R = TypeVar("R", bound=BaseModel)


class BusDatasetStorage:
    """Storage's dataset browsing as the API sees it."""

    def __init__(self, bus: Bus, *, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def list_images(self, request: ListImagesRequest) -> ListImagesReply:
        """`storage.list_images`."""
        return _decode(ListImagesReply, await self._ask(subjects.STORAGE_LIST_IMAGES, request))

    async def read_image(self, request: ReadImageRequest) -> ReadImageReply:
        """`storage.read_image`."""
        return _decode(ReadImageReply, await self._ask(subjects.STORAGE_READ_IMAGE, request))

    async def fetch_staged(self, object_name: str, destination: Path, *, sha256: str | None) -> Path:
        """An image storage put into the staging object store, copied to `destination` in chunks."""
        try:
            return await self._bus.get_file(object_name, destination, sha256=sha256)
        except NotFoundError as error:
            raise Unavailable(f"the image storage staged ({object_name}) is gone; try again") from error
        except PermanentError as error:  # sha256 mismatch
            raise Unavailable(f"the image storage staged ({object_name}) arrived corrupted: {error}") from error

    async def _ask(self, subject: str, request: BaseModel) -> bytes:
        try:
            raw = await self._bus.request(subject, request, timeout=self._timeout)
        except TransientError as error:
            raise Unavailable(f"the storage service did not answer {subject}: {error}") from error
        except Exception as error:  # broker disconnected
            raise Unavailable(f"the storage service is unreachable ({subject}): {error}") from error
        return raw


def _decode(model: type[R], raw: bytes) -> R:
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise Unavailable(f"the storage service sent an unreadable reply ({model.__name__})") from error
