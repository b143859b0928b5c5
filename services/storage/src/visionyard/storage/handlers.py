"""The storage service's FastStream subscribers: FastStream validates the payload, the use case runs, and
the settling middleware decides the ack.

Errors that can never succeed (invalid payload, unusable id, a staged file that is gone or corrupt)
become `PermanentError`, which is dead-lettered; anything else is retried with backoff. Each durable
consumer takes one message at a time: each can take minutes (a big archive), and messages pulled but not
yet started would sit out their ack_wait instead of going to an idle replica.

A message whose work can take minutes (a checkpoint copy, an archive check, a delete) is held with
`HeldMessage`: heartbeats while it runs, and the work cancelled (`BrokerLost`) once the broker has
confirmed no heartbeat for longer than the consumer's ack wait, since another replica has it by then: the
delivery is left unsettled for JetStream to redeliver (a nak of it would deliver the message twice).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from faststream.nats.annotations import NatsMessage
from pydantic import ValidationError

from visionyard.shared import streams, subjects
from visionyard.shared.bus import PermanentError
from visionyard.shared.bus.broker import ServiceBroker, consumer, listener, responder
from visionyard.shared.bus.held import HeldMessage
from visionyard.shared.bus.settle import Delivered
from visionyard.shared.commands import DeleteDataset, DeleteUploads, IngestDataset
from visionyard.shared.events import (
    CheckpointStaged,
    ExportPackageStaged,
    InferenceResultsStaged,
    decode_export_inference_event,
)
from visionyard.shared.requests import (
    CheckpointIncoming,
    KeepUploadReply,
    KeepUploadRequest,
    ListImagesReply,
    ListImagesRequest,
    PresignReply,
    PresignRequest,
    ReadImageReply,
    ReadImageRequest,
    StageObjectRequest,
    StageReply,
    StageRequest,
)
from visionyard.storage.export_inference import ExportInferenceStore
from visionyard.storage.ports import StagedObjectCorrupt, StagedObjectMissing
from visionyard.storage.service import InvalidMessage, StorageService

T = TypeVar("T")

QUEUE = "storage"
_PERMANENT = (InvalidMessage, StagedObjectMissing, StagedObjectCorrupt)
# Under the consumers' ack_wait (120 s), so a long archive check is never handed to another replica.
HEARTBEAT_SECONDS = 20.0


class StorageHandlers:
    """The storage service's message and request handlers."""

    def __init__(self, service: StorageService, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.service = service
        self.export_inference = ExportInferenceStore(service)
        self.heartbeat_seconds = heartbeat_seconds

    async def on_checkpoint_staged(self, event: CheckpointStaged, message: NatsMessage) -> None:
        """`evt.job.*.checkpoint` → keep the checkpoint and publish `ArtifactStored`."""
        async with self._held(message.raw_message, streams.STORAGE_ARTIFACTS) as held:
            await held.run(_permanent_on(_PERMANENT, self.service.store_checkpoint(event)))

    async def on_checkpoint_incoming(self, hint: CheckpointIncoming) -> None:
        """`storage.checkpoint_incoming` (a hint, no reply) → start copying while it is staged."""
        await self.service.prefetch_checkpoint(hint)

    async def on_ingest_dataset(self, command: IngestDataset, message: NatsMessage) -> None:
        """`cmd.dataset.ingest` → publish `DatasetReady` or `DatasetRejected`."""
        async with self._held(message.raw_message, streams.STORAGE_INGEST) as held:
            await held.run(_permanent_on(_PERMANENT, self.service.ingest_dataset(command)))

    async def on_delete_dataset(self, command: DeleteDataset, message: NatsMessage) -> None:
        """`cmd.dataset.delete` → delete the unpinned versions and publish `DatasetDeleted`."""
        async with self._held(message.raw_message, streams.STORAGE_DATASET_DELETE) as held:
            await held.run(_permanent_on(_PERMANENT, self.service.delete_dataset(command)))

    async def on_stage(self, request: StageRequest) -> StageReply:
        """`storage.stage` request → `StageReply`."""
        return await self.service.stage(request)

    async def on_presign(self, request: PresignRequest) -> PresignReply:
        """`storage.presign` request → `PresignReply`."""
        return await self.service.presign(request)

    async def on_list_images(self, request: ListImagesRequest) -> ListImagesReply:
        """`storage.list_images` request → `ListImagesReply`."""
        return await self.service.list_images(request)

    async def on_read_image(self, request: ReadImageRequest) -> ReadImageReply:
        """`storage.read_image` request → `ReadImageReply`."""
        return await self.service.read_image(request)

    async def on_keep_upload(self, request: KeepUploadRequest) -> KeepUploadReply:
        """`storage.keep_upload` request → `KeepUploadReply`: an uploaded file moved to the external bucket."""
        return await self.export_inference.keep_upload(request)

    async def on_stage_object(self, request: StageObjectRequest) -> StageReply:
        """`storage.stage_object` request → `StageReply`: a stored object staged for a runner."""
        return await self.export_inference.stage_object(request)

    async def on_staged(self, message: NatsMessage) -> None:
        """`evt.export.*.staged` / `evt.infer.*.staged` → keep the package or results in S3."""
        raw = message.raw_message
        event = _decode(lambda: decode_export_inference_event(raw.subject, raw.data))
        if not isinstance(event, (ExportPackageStaged, InferenceResultsStaged)):
            raise PermanentError(f"{raw.subject} is not a staged package/results event")
        await self.export_inference.keep_staged(event)

    async def on_delete_uploads(self, command: DeleteUploads) -> None:
        """`cmd.upload.delete` → delete a released session's uploaded images."""
        await self.export_inference.delete_uploads(command)

    def _held(self, msg: Delivered, spec: streams.ConsumerSpec) -> HeldMessage:
        # Only heartbeats and the broker-lost stop: the settling middleware settles what the handler returns or raises.
        return HeldMessage(msg, spec=spec, heartbeat_seconds=self.heartbeat_seconds)


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


def subscribe(broker: ServiceBroker, handlers: StorageHandlers) -> None:
    """Declare the storage service's subscribers on `broker`."""
    for subject, answer, what in (
        (subjects.STORAGE_STAGE, handlers.on_stage, "Stage a dataset version for a runner"),
        (subjects.STORAGE_PRESIGN, handlers.on_presign, "A presigned URL of a stored object"),
        (subjects.STORAGE_LIST_IMAGES, handlers.on_list_images, "A page of a dataset version's images"),
        (subjects.STORAGE_READ_IMAGE, handlers.on_read_image, "One image of a dataset version"),
        (subjects.STORAGE_KEEP_UPLOAD, handlers.on_keep_upload, "Keep an uploaded image"),
        (subjects.STORAGE_STAGE_OBJECT, handlers.on_stage_object, "Stage a stored object for a runner"),
    ):
        responder(broker, subject, queue=QUEUE, description=what)(answer)
    listener(broker, subjects.STORAGE_CHECKPOINT_INCOMING, queue=QUEUE,
             description="A checkpoint is being staged: start copying it")(handlers.on_checkpoint_incoming)
    consumer(broker, streams.STORAGE_ARTIFACTS, description="Keep a staged checkpoint")(handlers.on_checkpoint_staged)
    consumer(broker, streams.STORAGE_INGEST, description="Check and store a dataset")(handlers.on_ingest_dataset)
    consumer(broker, streams.STORAGE_DATASET_DELETE,
             description="Delete a dataset's unpinned versions")(handlers.on_delete_dataset)
    consumer(broker, streams.STORAGE_SHIPPED, description="Keep a staged export package or inference results")(
        handlers.on_staged)
    consumer(broker, streams.STORAGE_UPLOAD_DELETE, batch=10,
             description="Delete a released session's uploaded images")(handlers.on_delete_uploads)
