"""Bus adapters: decode a message, call the use case, and let the bus decide the ack.

Errors that can never succeed (undecodable payload, unusable id, a staged file that is gone or
corrupt) become `PermanentError`, which the bus dead-letters; anything else is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from visionyard.shared.bus import PermanentError
from visionyard.shared.commands import DeleteDataset, IngestDataset
from visionyard.shared.events import (
    CheckpointIncoming,
    CheckpointStaged,
    ListImagesRequest,
    PresignRequest,
    ReadImageRequest,
    StageRequest,
    decode_job_event,
)
from visionyard.storage.ports import StagedObjectCorrupt, StagedObjectMissing
from visionyard.storage.service import InvalidMessage, StorageService

T = TypeVar("T")

_PERMANENT = (InvalidMessage, StagedObjectMissing, StagedObjectCorrupt)
# Under the consumers' ack_wait (120 s), so a long archive check is never handed to another replica.
HEARTBEAT_SECONDS = 20.0


class StorageHandlers:
    """The storage service's message and request handlers."""

    def __init__(self, service: StorageService, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.service = service
        self.heartbeat_seconds = heartbeat_seconds

    async def on_checkpoint_staged(self, msg: Msg) -> None:
        """`evt.job.*.checkpoint` → keep the checkpoint and publish `ArtifactStored`."""
        event = _decode(lambda: decode_job_event(msg.subject, msg.data))
        if not isinstance(event, CheckpointStaged):
            raise PermanentError(f"{msg.subject} is not a checkpoint event")
        async with self._keep_alive(msg):
            await _permanent_on(_PERMANENT, self.service.store_checkpoint(event))

    async def on_checkpoint_incoming(self, data: bytes) -> None:
        """`storage.checkpoint_incoming` (a hint, no reply) → start copying while it is staged."""
        try:
            hint = CheckpointIncoming.model_validate_json(data)
        except ValidationError as error:
            raise PermanentError(f"undecodable checkpoint hint: {error}") from error
        await self.service.prefetch_checkpoint(hint)

    async def on_ingest_dataset(self, msg: Msg) -> None:
        """`cmd.dataset.ingest` → publish `DatasetReady` or `DatasetRejected`."""
        command = _decode(lambda: IngestDataset.model_validate_json(msg.data))
        async with self._keep_alive(msg):
            await _permanent_on(_PERMANENT, self.service.ingest_dataset(command))

    async def on_delete_dataset(self, msg: Msg) -> None:
        """`cmd.dataset.delete` → delete the unpinned versions and publish `DatasetDeleted`."""
        command = _decode(lambda: DeleteDataset.model_validate_json(msg.data))
        async with self._keep_alive(msg):
            await _permanent_on(_PERMANENT, self.service.delete_dataset(command))

    async def on_stage(self, data: bytes) -> bytes:
        """`storage.stage` request → `StageReply`."""
        try:
            request = StageRequest.model_validate_json(data)
        except ValidationError as error:
            return _reply_error(f"invalid stage request: {error.errors()[0].get('msg')}")
        reply: BaseModel = await self.service.stage(request)
        return reply.model_dump_json().encode()

    async def on_presign(self, data: bytes) -> bytes:
        """`storage.presign` request → `PresignReply`."""
        try:
            request = PresignRequest.model_validate_json(data)
        except ValidationError as error:
            return _reply_error(f"invalid presign request: {error.errors()[0].get('msg')}")
        reply: BaseModel = await self.service.presign(request)
        return reply.model_dump_json().encode()

    async def on_list_images(self, data: bytes) -> bytes:
        """`storage.list_images` request → `ListImagesReply`."""
        try:
            request = ListImagesRequest.model_validate_json(data)
        except ValidationError as error:
            return _reply_error(f"invalid list_images request: {error.errors()[0].get('msg')}")
        reply: BaseModel = await self.service.list_images(request)
        return reply.model_dump_json().encode()

    async def on_read_image(self, data: bytes) -> bytes:
        """`storage.read_image` request → `ReadImageReply`."""
        try:
            request = ReadImageRequest.model_validate_json(data)
        except ValidationError as error:
            return _reply_error(f"invalid read_image request: {error.errors()[0].get('msg')}")
        reply: BaseModel = await self.service.read_image(request)
        return reply.model_dump_json().encode()

    @contextlib.asynccontextmanager
    async def _keep_alive(self, msg: Msg) -> AsyncIterator[None]:
        """Tell JetStream we are still working on `msg` while the body runs."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_seconds)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _decode(decoder: Callable[[], T]) -> T:
    try:
        return decoder()
    except (ValueError, ValidationError) as error:
        raise PermanentError(f"undecodable message: {error}") from error


async def _permanent_on(errors: tuple[type[Exception], ...], work: Awaitable[object]) -> None:
    try:
        await work
    except errors as error:
        raise PermanentError(str(error)) from error


def _reply_error(reason: str) -> bytes:
    return json.dumps({"ok": False, "error": reason}).encode()
