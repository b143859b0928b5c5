"""The storage service's FastStream subscribers on `TestNatsBroker`: each subject reaches its use case with
a validated payload; an invalid one is refused, naming the field (a reply) or dead-lettered (a command)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faststream.nats import TestNatsBroker
from pydantic import BaseModel

from visionyard.shared import subjects
from visionyard.shared.asyncapi import undocumented
from visionyard.shared.bus.broker import service_broker
from visionyard.shared.commands import DeleteDataset, DeleteUploads, IngestDataset
from visionyard.shared.events import CheckpointStaged
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
from visionyard.storage.handlers import StorageHandlers, subscribe


class Recording:
    """Stands in for the use cases: notes each call and answers a fixed reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, BaseModel]] = []

    def __getattr__(self, name: str) -> Any:
        replies: dict[str, BaseModel] = {
            "stage": StageReply(ok=True, object_name="o"), "presign": PresignReply(ok=True, url="http://x"),
            "list_images": ListImagesReply(ok=True, total_images=3), "read_image": ReadImageReply(ok=True, size=1),
            "keep_upload": KeepUploadReply(ok=True, key="k"), "stage_object": StageReply(ok=True, object_name="s"),
        }

        async def use_case(argument: BaseModel) -> Any:
            self.calls.append((name, argument))
            return replies.get(name)

        return use_case


class Parked:
    def __init__(self) -> None:
        self.reasons: list[tuple[str, str]] = []

    async def dead_letter(self, msg: Any, *, consumer: str, reason: str) -> None:
        self.reasons.append((consumer, reason))


@pytest.fixture
def world() -> tuple[Any, Recording, Parked]:
    broker = service_broker("nats://127.0.0.1:1", service="storage")
    parked = Parked()
    broker.dead_letters = parked
    use_cases = Recording()
    handlers = StorageHandlers(use_cases, heartbeat_seconds=60)  # type: ignore[arg-type]
    handlers.export_inference = use_cases  # type: ignore[assignment]
    subscribe(broker, handlers)
    return broker, use_cases, parked


REQUESTS = [
    (subjects.STORAGE_STAGE, StageRequest(dataset_id="d", content_hash="h"), "stage", "object_name"),
    (subjects.STORAGE_PRESIGN, PresignRequest(uri="s3://b/k"), "presign", "url"),
    (subjects.STORAGE_LIST_IMAGES, ListImagesRequest(dataset_id="d", content_hash="h"), "list_images", "total_images"),
    (subjects.STORAGE_READ_IMAGE, ReadImageRequest(dataset_id="d", content_hash="h", filename="a.png"),
     "read_image", "size"),
    (subjects.STORAGE_KEEP_UPLOAD, KeepUploadRequest(session_id="s", filename="a.png", object_name="o", sha256="0"),
     "keep_upload", "key"),
    (subjects.STORAGE_STAGE_OBJECT, StageObjectRequest(uri="s3://b/k"), "stage_object", "object_name"),
]


@pytest.mark.parametrize(("subject", "request_model", "use_case", "field"), REQUESTS)
async def test_each_request_reaches_its_use_case_and_a_bad_one_names_the_field(
    world: tuple[Any, Recording, Parked], subject: str, request_model: BaseModel, use_case: str, field: str
) -> None:
    broker, use_cases, _ = world
    async with TestNatsBroker(broker) as test_broker:
        reply = json.loads((await test_broker.request(request_model, subject)).body)
        first = next(iter(type(request_model).model_fields))
        refused = json.loads((await test_broker.request({first: {"not": "a string"}}, subject)).body)
    assert use_cases.calls == [(use_case, request_model)]
    assert reply["ok"] is True and reply[field] is not None
    assert refused["ok"] is False
    assert first in refused["error"]


async def test_commands_and_events_reach_their_use_cases_and_an_invalid_one_is_dead_lettered(
    world: tuple[Any, Recording, Parked],
) -> None:
    broker, use_cases, parked = world
    ingest = IngestDataset(dataset_id="d", object_name="o", sha256="0", size_bytes=1, filename="d.zip")
    delete = DeleteDataset(dataset_id="d")
    uploads = DeleteUploads(session_id="s", keys=["k.png"])
    staged = CheckpointStaged(job_id="j", attempt=1, seq=3, checkpoint_kind="best", object_name="o", sha256="0",
                              size_bytes=1)
    hint = CheckpointIncoming(job_id="j", attempt=1, seq=3, checkpoint_kind="best", object_name="o", object_id="i",
                              size_bytes=1)
    async with TestNatsBroker(broker) as test_broker:
        for message, subject in ((ingest, ingest.subject), (delete, delete.subject), (uploads, uploads.subject),
                                 (staged, staged.subject())):
            await test_broker.publish(message.to_bytes(), subject)
        await test_broker.publish(hint, subjects.STORAGE_CHECKPOINT_INCOMING)
        await test_broker.publish({"dataset_id": "d"}, subjects.CMD_DATASET_INGEST)
    assert [name for name, _ in use_cases.calls] == [
        "ingest_dataset", "delete_dataset", "delete_uploads", "store_checkpoint", "prefetch_checkpoint"
    ]
    assert [call for _, call in use_cases.calls] == [ingest, delete, uploads, staged, hint]
    (consumer, reason), = parked.reasons
    assert consumer == "storage-ingest" and "object_name" in reason


def test_every_subscriber_is_in_the_platforms_asyncapi_document(world: tuple[Any, Recording, Parked]) -> None:
    broker, _, _ = world
    assert undocumented(broker) == []


async def test_a_command_of_an_unknown_major_version_is_dead_lettered_with_the_reason(
    world: tuple[Any, Recording, Parked],
) -> None:
    broker, use_cases, parked = world
    ingest = IngestDataset(dataset_id="d", object_name="o", sha256="0", size_bytes=1, filename="d.zip")
    newer = {**json.loads(ingest.to_bytes()), "schema_version": "2.0"}
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(json.dumps(newer).encode(), ingest.subject)
    assert use_cases.calls == []
    (consumer, reason), = parked.reasons
    assert consumer == "storage-ingest" and reason.startswith("unsupported schema version: schema_version 2.0 is of major version 2")
