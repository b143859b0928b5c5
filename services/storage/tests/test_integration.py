"""The storage service against a real nats-server: ingest, checkpoints, stage and presign round trips."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.bus.broker import consumer, service_broker
from visionyard.shared.commands import IngestDataset
from visionyard.shared.events import ArtifactStored, CheckpointStaged, DatasetReady, DatasetRejected
from visionyard.shared.messages import Message
from visionyard.shared.natsserver import NatsServer
from visionyard.shared.requests import CheckpointIncoming, PresignReply, PresignRequest, StageReply, StageRequest
from visionyard.storage.adapters.local import LocalDirectoryBackend, PartialFileUpload
from visionyard.storage.adapters.staging import BusStagingArea
from visionyard.storage.config import StorageSettings
from visionyard.storage.handlers import StorageHandlers
from visionyard.storage.incoming import CLAIM_SECONDS
from visionyard.storage.main import serve
from visionyard.storage.service import Buckets, StorageService

pytestmark = pytest.mark.integration

WAIT = 30.0  # an upper bound so a broken service fails the test instead of hanging it


def local_path(uri: str) -> Path:
    """The file behind a `file://` URI."""
    return Path(unquote(urlparse(uri).path))


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path) -> StorageSettings:
    """Embedded settings on the test's broker and data directory."""
    return StorageSettings(nats_url=nats_server.url, data_dir=tmp_path / "data")


async def start_storage(settings: StorageSettings) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """Run the storage service in this loop, the same way `visionyard-storage` does."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop=stop))
    return stop, task


def s3_settings(nats_server: NatsServer, s3_endpoint: str, tmp_path: Path, *, suffix: str) -> StorageSettings:
    """Settings on the S3 backend (moto), with buckets of the test's own."""
    return StorageSettings(
        nats_url=nats_server.url, data_dir=tmp_path / "data", backend="s3", s3_endpoint_url=s3_endpoint,
        s3_access_key_id="testing", s3_secret_access_key="testing",
        internal_bucket=f"it-internal{suffix}", external_bucket=f"it-external{suffix}",
    )


@pytest.fixture
async def storage(bus: Bus, settings: StorageSettings) -> AsyncIterator[StorageSettings]:
    """A running storage service; stopped (and drained) at the end of the test."""
    stop, task = await start_storage(settings)
    # Ready once it answers requests.
    for _ in range(200):
        try:
            await bus.request(subjects.STORAGE_STAGE, StageRequest(), timeout=0.5)
            break
        except Exception:
            await asyncio.sleep(0.05)
    yield settings
    stop.set()
    await asyncio.wait_for(task, WAIT)


async def upload(bus: Bus, path: Path, *, dataset_id: str) -> IngestDataset:
    """What the API does: stage the zip, then send the ingest command."""
    name = f"upload/{dataset_id}/{path.stem}.zip"
    sha256, size = await bus.put_file(name, path)
    command = IngestDataset(dataset_id=dataset_id, object_name=name, sha256=sha256, size_bytes=size, filename=path.name)
    await bus.publish(command)
    return command


async def stage_checkpoint(bus: Bus, tmp_path: Path, data: bytes, *, job_id: str, seq: int = 1) -> CheckpointStaged:
    """What a runner does: stage the checkpoint file, then publish the event."""
    source = tmp_path / f"{job_id}-{seq}.pt"
    source.write_bytes(data)
    name = f"ckpt/{job_id}/1/{seq}-best.pt"
    sha256, size = await bus.put_file(name, source)
    event = CheckpointStaged(
        job_id=job_id, attempt=1, seq=seq, checkpoint_kind="best", object_name=name, sha256=sha256,
        size_bytes=size, epoch=3,
    )
    await bus.publish(event)
    return event


async def test_ingest_command_yields_ready_dataset_that_stages_and_presigns(
    bus: Bus, storage: StorageSettings, make_zip: Callable[..., Path], flat_dataset
) -> None:
    events = await bus.nc.subscribe(subjects.dataset_event("ds1", "*"))
    await upload(bus, make_zip(flat_dataset, name="pets.zip"), dataset_id="ds1")
    ready = DatasetReady.model_validate_json((await events.next_msg(timeout=WAIT)).data)
    assert ready.num_images == 5 and ready.class_names == ["cats", "dogs"] and ready.format == "imagefolder"
    stored = local_path(ready.uri)
    assert stored.is_file() and stored.stat().st_size == ready.size_bytes
    assert str(stored).startswith(str(storage.storage_root.resolve() / "visionyard-external" / "datasets" / "ds1"))

    reply = StageReply.model_validate_json(
        await bus.request(subjects.STORAGE_STAGE, StageRequest(dataset_id="ds1", content_hash=ready.content_hash))
    )
    assert reply.ok and reply.object_name == f"dataset/{ready.content_hash}.zip"
    staged = await bus.get_file(reply.object_name or "", storage.data_dir / "got.zip", sha256=reply.sha256)
    assert staged.read_bytes() == stored.read_bytes()

    presigned = PresignReply.model_validate_json(await bus.request(subjects.STORAGE_PRESIGN, PresignRequest(uri=ready.uri)))
    assert presigned.ok and presigned.url == ready.uri


async def test_unsafe_upload_is_rejected_and_nothing_is_stored(
    bus: Bus, storage: StorageSettings, make_zip: Callable[..., Path], images
) -> None:
    events = await bus.nc.subscribe(subjects.dataset_event("ds2", "*"))
    archive = make_zip([("cats/a.png", images["png"]()), ("dogs/a.png", images["png"]()), ("/etc/cron.png", b"x")])
    await upload(bus, archive, dataset_id="ds2")
    message = await events.next_msg(timeout=WAIT)
    assert message.subject == subjects.dataset_event("ds2", "rejected")
    assert "/etc/cron.png" in DatasetRejected.model_validate_json(message.data).reason
    assert not list((storage.storage_root / "visionyard-external").rglob("*.zip"))


async def test_staged_checkpoint_is_stored_verified_and_resumable(
    bus: Bus, storage: StorageSettings, tmp_path: Path
) -> None:
    events = await bus.nc.subscribe(subjects.job_event("job1", "artifact_stored"))
    data = os.urandom(300_000)
    event = await stage_checkpoint(bus, tmp_path, data, job_id="job1")
    stored = ArtifactStored.model_validate_json((await events.next_msg(timeout=WAIT)).data)
    assert (stored.seq, stored.attempt, stored.epoch, stored.checkpoint_kind) == (1, 1, 3, "best")
    path = local_path(stored.uri)
    assert path.name == "best.pt" and path.parent.name == "job1"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == event.sha256 == stored.sha256

    reply = StageReply.model_validate_json(
        await bus.request(subjects.STORAGE_STAGE, StageRequest(job_id="job1", checkpoint_kind="best"))
    )
    assert reply.ok and reply.object_name == "resume/job1/best.pt" and reply.epoch == 3
    resumed = await bus.get_file("resume/job1/best.pt", tmp_path / "resume.pt", sha256=reply.sha256)
    assert resumed.read_bytes() == data
    nothing = StageReply.model_validate_json(
        await bus.request(subjects.STORAGE_STAGE, StageRequest(job_id="job2", checkpoint_kind="best"))
    )
    assert not nothing.ok and nothing.error == "no stored checkpoint"


async def test_checkpoint_with_wrong_sha256_is_dead_lettered_not_stored(
    bus: Bus, storage: StorageSettings, tmp_path: Path
) -> None:
    source = tmp_path / "c.pt"
    source.write_bytes(b"real bytes")
    await bus.put_file("ckpt/job3/1/1-best.pt", source)
    await bus.publish(CheckpointStaged(
        job_id="job3", attempt=1, seq=1, checkpoint_kind="best", object_name="ckpt/job3/1/1-best.pt",
        sha256="0" * 64, size_bytes=10,
    ))
    for _ in range(int(WAIT / 0.05)):
        if (await bus.js.stream_info(streams.DEADLETTERS.name)).state.messages:
            break
        await asyncio.sleep(0.05)
    dead = await bus.js.get_last_msg(streams.DEADLETTERS.name, subjects.dead_letter(streams.STORAGE_ARTIFACTS.durable))
    assert "sha256" in (dead.headers or {}).get("Visionyard-Reason", "")
    assert not (storage.storage_root / "visionyard-internal" / "checkpoints" / "job3").exists()


class FlakyPublisher:
    """Publishes through the bus, but the first publish fails as if the broker dropped the connection."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.failures_left = 1

    async def publish(self, message: Message) -> object:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("broker went away")
        return await self.bus.publish(message)


class CountingBackend(LocalDirectoryBackend):
    """The local backend, counting streamed uploads."""

    uploads = 0

    def begin_upload(self, bucket: str, key: str) -> PartialFileUpload:
        self.uploads += 1
        return super().begin_upload(bucket, key)


async def test_redelivered_checkpoint_event_is_stored_once_and_announced_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    backend = CountingBackend(tmp_path / "root")
    publisher = FlakyPublisher(bus)
    service = StorageService(
        backend=backend, staging=BusStagingArea(bus), publisher=publisher, workdir=tmp_path / "work",
        buckets=Buckets(),
    )
    handlers = StorageHandlers(service)
    events = await bus.nc.subscribe(subjects.job_event("job4", "artifact_stored"))
    event = await stage_checkpoint(bus, tmp_path, b"weights" * 1000, job_id="job4")
    await bus.publish(event)  # the runner retried its publish: de-duplicated by message id

    broker = service_broker(nats_server.url, service="storage")
    consumer(broker, streams.STORAGE_ARTIFACTS)(handlers.on_checkpoint_staged)
    consuming = await Bus.from_broker(broker)
    await broker.start()
    first = await events.next_msg(timeout=WAIT)  # after the nak'ed first delivery, the redelivery
    # A second copy of the same event from a restarted runner (new message id, same content).
    await bus.publish(event.model_copy(update={"message_id": "retry-from-runner"}))
    second = await events.next_msg(timeout=WAIT)
    await asyncio.wait_for(consuming.close(), WAIT)

    assert backend.uploads == 1
    assert ArtifactStored.model_validate_json(first.data).message_id == f"stored-{event.message_id}"
    assert ArtifactStored.model_validate_json(second.data).message_id == "stored-retry-from-runner"
    info = await bus.js.stream_info(streams.EVENTS.name, subjects_filter=subjects.job_event("job4", "artifact_stored"))
    assert info.state.messages >= 1 and (info.state.subjects or {}).get(subjects.job_event("job4", "artifact_stored")) == 2
    consumer_info = await bus.js.consumer_info(streams.EVENTS.name, streams.STORAGE_ARTIFACTS.durable)
    assert consumer_info.num_ack_pending == 0 and publisher.failures_left == 0  # it was redelivered


async def test_checkpoint_is_stored_in_s3(bus: Bus, nats_server: NatsServer, s3_endpoint: str, tmp_path: Path) -> None:
    from visionyard.storage.adapters.s3 import S3Backend

    settings = s3_settings(nats_server, s3_endpoint, tmp_path, suffix="")
    events = await bus.nc.subscribe(subjects.job_event("job5", "artifact_stored"))
    stop, task = await start_storage(settings)
    data = os.urandom(100_000)
    event = await stage_checkpoint(bus, tmp_path, data, job_id="job5")
    stored = ArtifactStored.model_validate_json((await events.next_msg(timeout=WAIT)).data)
    stop.set()
    await asyncio.wait_for(task, WAIT)

    assert stored.uri == "s3://it-internal/checkpoints/job5/best.pt"
    s3 = S3Backend(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    assert s3.sha256("it-internal", "checkpoints/job5/best.pt") == event.sha256
    sidecar = json.loads(s3.read_bytes("it-internal", "checkpoints/job5/best.json") or b"{}")
    assert sidecar["seq"] == 1 and sidecar["sha256"] == event.sha256 and sidecar["uri"] == stored.uri


async def test_large_checkpoint_streams_into_s3_and_a_corrupt_one_is_aborted(
    bus: Bus, nats_server: NatsServer, s3_endpoint: str, tmp_path: Path
) -> None:
    from visionyard.storage.adapters import s3 as s3_adapter
    from visionyard.storage.adapters.s3 import S3Backend

    settings = s3_settings(nats_server, s3_endpoint, tmp_path, suffix="-big")
    s3 = S3Backend(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    events = await bus.nc.subscribe(subjects.job_event("job6", "artifact_stored"))
    stop, task = await start_storage(settings)
    try:
        data = os.urandom(40 * 1024 * 1024 + 5)  # several multipart parts, a short last one
        event = await stage_checkpoint(bus, tmp_path, data, job_id="job6")
        stored = ArtifactStored.model_validate_json((await events.next_msg(timeout=WAIT)).data)
        assert stored.size_bytes == len(data)
        assert s3.sha256("it-internal-big", "checkpoints/job6/best.pt") == event.sha256
        # Each part went up with its CRC32: the object's checksum is the CRC32 of the parts' CRC32s.
        head = s3.client.head_object(Bucket="it-internal-big", Key="checkpoints/job6/best.pt", ChecksumMode="ENABLED")
        part_size = s3_adapter.PART_SIZE
        parts = b"".join(zlib.crc32(data[start:start + part_size]).to_bytes(4, "big")
                         for start in range(0, len(data), part_size))
        assert head["ChecksumCRC32"].split("-")[0] == base64.b64encode(zlib.crc32(parts).to_bytes(4, "big")).decode()

        # Staged bytes that are not the declared ones: streamed up to the last byte, then never completed.
        source = tmp_path / "job7.pt"
        source.write_bytes(os.urandom(40 * 1024 * 1024))
        await bus.put_file("ckpt/job7/1/1-best.pt", source)
        await bus.publish(CheckpointStaged(
            job_id="job7", attempt=1, seq=1, checkpoint_kind="best", object_name="ckpt/job7/1/1-best.pt",
            sha256="0" * 64, size_bytes=source.stat().st_size,
        ))
        dead_letters = subjects.dead_letter(streams.STORAGE_ARTIFACTS.durable)
        for _ in range(int(WAIT / 0.05)):
            info = await bus.js.stream_info(streams.DEADLETTERS.name, subjects_filter=dead_letters)
            if info.state.messages:
                break
            await asyncio.sleep(0.05)
        dead = await bus.js.get_last_msg(streams.DEADLETTERS.name, dead_letters)
        assert "sha256" in (dead.headers or {}).get("Visionyard-Reason", "")
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
    assert not s3.exists("it-internal-big", "checkpoints/job7/best.pt")
    assert s3.read_bytes("it-internal-big", "checkpoints/job7/best.json") is None
    assert s3.client.list_multipart_uploads(Bucket="it-internal-big").get("Uploads", []) == []  # aborted


async def _until_subscribed(server: NatsServer, subject: str) -> None:
    """Wait until the server has a subscription on `subject` (its monitoring endpoint says so)."""

    def subscribed() -> bool:
        url = f"http://127.0.0.1:{server.monitor_port}/subsz?subs=1&test={subject}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(json.loads(reply.read()).get("total"))

    for _ in range(400):
        if await asyncio.to_thread(subscribed):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"nobody subscribed to {subject}")


async def test_an_announced_checkpoint_is_copied_into_s3_while_it_is_staged(
    bus: Bus, nats_server: NatsServer, s3_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from visionyard.storage.adapters.s3 import S3Backend

    settings = s3_settings(nats_server, s3_endpoint, tmp_path, suffix="-early")
    s3 = S3Backend(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")
    events = await bus.nc.subscribe(subjects.job_event("job8", "artifact_stored"))
    stop, task = await start_storage(settings)
    caplog.set_level(logging.INFO, logger="visionyard.storage")
    try:
        await _until_subscribed(nats_server, subjects.STORAGE_CHECKPOINT_INCOMING)  # a hint before it is lost
        source = tmp_path / "job8.pt"
        source.write_bytes(os.urandom(20 * 1024 * 1024 + 3))
        name, object_id = "ckpt/job8/1/1-best.pt", bus.new_object_id()
        # What the runner does for a large checkpoint: announce it, put it, then publish the event.
        await bus.notify(subjects.STORAGE_CHECKPOINT_INCOMING, CheckpointIncoming(
            job_id="job8", attempt=1, seq=1, checkpoint_kind="best", object_name=name, object_id=object_id,
            size_bytes=source.stat().st_size,
        ))
        sha256, size = await bus.put_file(name, source, object_id=object_id)
        await bus.publish(CheckpointStaged(
            job_id="job8", attempt=1, seq=1, checkpoint_kind="best", object_name=name, sha256=sha256,
            size_bytes=size,
        ))
        stored = ArtifactStored.model_validate_json((await events.next_msg(timeout=WAIT)).data)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
    assert stored.size_bytes == size and s3.sha256("it-internal-early", "checkpoints/job8/best.pt") == sha256
    assert any("copied while it was staged" in record.getMessage() for record in caplog.records)
    assert s3.client.list_multipart_uploads(Bucket="it-internal-early").get("Uploads", []) == []


def test_console_script_runs_until_sigterm_and_exits_zero(nats_server: NatsServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VISIONYARD_STORAGE_NATS_URL": nats_server.url,
        "VISIONYARD_STORAGE_DATA_DIR": str(tmp_path / "data"),
    }
    script = Path(sys.executable).with_name("visionyard-storage")
    process = subprocess.Popen([str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Started once its log says so (the buckets exist by then).
        assert process.stderr is not None
        for line in process.stderr:
            if b"storage service running" in line:
                break
        assert (tmp_path / "data" / "storage" / "visionyard-internal").is_dir()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_storage_killed_during_an_early_copy_loses_nothing(
    bus: Bus, nats_server: NatsServer, s3_endpoint: str, tmp_path: Path
) -> None:
    """kill -9 while an announced checkpoint is being copied: nothing half-written becomes visible, and the
    restarted storage stores the checkpoint from its event the ordinary way."""
    from visionyard.storage.adapters.s3 import S3Backend

    bucket = "it-internal-killed"
    env = {
        **os.environ,
        "VISIONYARD_STORAGE_NATS_URL": nats_server.url,
        "VISIONYARD_STORAGE_DATA_DIR": str(tmp_path / "data"),
        "VISIONYARD_STORAGE_BACKEND": "s3",
        "VISIONYARD_STORAGE_S3_ENDPOINT_URL": s3_endpoint,
        "VISIONYARD_STORAGE_S3_ACCESS_KEY_ID": "testing",
        "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY": "testing",
        "VISIONYARD_STORAGE_INTERNAL_BUCKET": bucket,
        "VISIONYARD_STORAGE_EXTERNAL_BUCKET": "it-external-killed",
    }
    script = str(Path(sys.executable).with_name("visionyard-storage"))
    s3 = S3Backend(endpoint_url=s3_endpoint, access_key_id="testing", secret_access_key="testing")

    logged: list[str] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert process.stderr is not None
        for line in process.stderr:
            if b"storage service running" in line:
                # Read on: a service whose stderr pipe fills blocks in its next log call, copy and all.
                threading.Thread(target=lambda: logged.extend(map(bytes.decode, process.stderr or [])),
                                 daemon=True).start()
                return process
        raise AssertionError("storage did not start")

    def open_uploads() -> list[dict[str, object]]:
        return list(s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    stored_events = await bus.nc.subscribe(subjects.job_event("job9", "artifact_stored"))
    source = tmp_path / "job9.pt"
    source.write_bytes(os.urandom(20 * 1024 * 1024 + 1))
    name, object_id = "ckpt/job9/1/1-best.pt", bus.new_object_id()
    first = await asyncio.to_thread(start)
    try:
        # The hint is core NATS: announced before storage's subscription reaches the server, it is lost.
        await _until_subscribed(nats_server, subjects.STORAGE_CHECKPOINT_INCOMING)
        # What the runner does for a large checkpoint: announce it, then put it.
        await bus.notify(subjects.STORAGE_CHECKPOINT_INCOMING, CheckpointIncoming(
            job_id="job9", attempt=1, seq=1, checkpoint_kind="best", object_name=name, object_id=object_id,
            size_bytes=source.stat().st_size,
        ))
        sha256, size = await bus.put_file(name, source, object_id=object_id)
        # The early copy sends parts, then holds its upload open until the event, which the test has
        # not published: an open upload is a state that lasts (CLAIM_SECONDS), not a moment to catch.
        # So the wait ends when it is seen or the copy is known to have stopped, and is bounded only
        # by how slow a busy machine may make storage, well inside the claim time. Kill it then.
        deadline = time.monotonic() + CLAIM_SECONDS / 2
        while not await asyncio.to_thread(open_uploads):
            stopped = [line for line in logged if "incoming copy of" in line]
            assert not stopped and first.poll() is None and time.monotonic() < deadline, (
                f"no early copy under way; storage logged: {logged[-20:]}")
            await asyncio.sleep(0.05)
    finally:
        first.kill()
        await asyncio.to_thread(first.wait)
    assert not s3.exists(bucket, "checkpoints/job9/best.pt")  # parts sent, nothing completed

    await bus.publish(CheckpointStaged(job_id="job9", attempt=1, seq=1, checkpoint_kind="best", object_name=name,
                                       sha256=sha256, size_bytes=size))
    second = await asyncio.to_thread(start)
    try:
        stored = ArtifactStored.model_validate_json((await stored_events.next_msg(timeout=WAIT)).data)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, WAIT) == 0
    assert stored.sha256 == sha256 and s3.sha256(bucket, "checkpoints/job9/best.pt") == sha256
    # The killed process's upload stays open (invisible; the bucket's lifecycle rule removes it).
    assert len(await asyncio.to_thread(open_uploads)) == 1
