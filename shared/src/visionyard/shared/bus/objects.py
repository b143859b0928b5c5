"""The staging object store's fast path: chunked puts with PubAcks in flight, pull-consumer reads.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from visionyard.shared import streams
from visionyard.shared.bus.errors import PermanentError, TransientError
from visionyard.shared.bus.topology import Topology

# How many bytes of an object's chunks one pull asks for while reading it.
OBJECT_READ_WINDOW = 16 * 1024 * 1024
# A read that gets nothing for this long has broken off (the broker went away); it is retried whole.
OBJECT_READ_STALL_SECONDS = 10.0
# How many of an object's chunks a put has sent before it awaits the oldest one's PubAck.
OBJECT_PUT_IN_FLIGHT = 8
# How long a put waits for one chunk's PubAck.
OBJECT_PUT_ACK_SECONDS = 30.0


class Objects(Topology):
    """Files through the staging object store, in its own (ADR-20) layout."""

    def new_object_id(self) -> str:
        """A fresh id for an object's chunks (its `nuid`): `put_file(..., object_id=)` puts them under it,
        so a reader told the id beforehand can read them while they are still being put."""
        return self._nuid.next().decode()

    async def put_file(self, name: str, path: Path, *, object_id: str | None = None) -> tuple[str, int]:
        """Put a file into the staging object store; returns its sha256 and size.

        The object store's own layout (ADR-20: chunks on `$O.<bucket>.C.<nuid>`, then the info as a
        rollup on `$O.<bucket>.M.<name>`), so any client reads it, but written here rather than by
        nats-py's `ObjectStore.put`: chunks as large as the server takes, several in flight instead of
        one PubAck round trip each (profiled as most of a large checkpoint's staging time), the digest
        computed beside the file read, and a chunk subject the caller may know in advance.
        """
        store = await self.object_store()
        object_id = object_id or self.new_object_id()
        bucket = streams.OBJECT_STAGING
        stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        chunk_subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=object_id)
        try:
            previous: api.ObjectInfo | None = await store.get_info(name, show_deleted=True)
        except NotFoundError:
            previous = None
        chunk_size = self._chunk_size()
        digest = hashlib.sha256()
        size = chunks = 0
        in_flight: collections.deque[asyncio.Future[api.PubAck]] = collections.deque()

        def read_chunk(handle: Any) -> bytes:
            data: bytes = handle.read(chunk_size)
            digest.update(data)  # hashlib releases the GIL for large buffers
            return data

        try:
            with path.open("rb") as handle:
                while data := await asyncio.to_thread(read_chunk, handle):
                    in_flight.append(await self.js.publish_async(chunk_subject, data))
                    size += len(data)
                    chunks += 1
                    while len(in_flight) >= OBJECT_PUT_IN_FLIGHT:
                        await asyncio.wait_for(in_flight.popleft(), OBJECT_PUT_ACK_SECONDS)
            while in_flight:
                await asyncio.wait_for(in_flight.popleft(), OBJECT_PUT_ACK_SECONDS)
            info = api.ObjectInfo(
                name=name, bucket=bucket, nuid=object_id, size=size, chunks=chunks,
                mtime=datetime.now(UTC).isoformat(),
                digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(digest.digest()).decode()),
                options=api.ObjectMetaOptions(max_chunk_size=chunk_size),
            )
            meta_subject = OBJ_META_PRE_TEMPLATE.format(
                bucket=bucket, obj=base64.urlsafe_b64encode(name.encode()).decode()
            )
            await self.js.publish(
                meta_subject, json.dumps(info.as_dict()).encode(), headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT}
            )
        except BaseException:
            for future in in_flight:
                future.cancel()
            with contextlib.suppress(Exception):
                await self.js.purge_stream(stream, subject=chunk_subject)
            raise
        if previous is not None and previous.nuid and previous.nuid != object_id:
            # The name now points at the new chunks; the old ones are garbage.
            with contextlib.suppress(Exception):
                await self.js.purge_stream(
                    stream, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=previous.nuid)
                )
        return digest.hexdigest(), size

    def _chunk_size(self) -> int:
        # Leave room for the protocol's own bytes under the server's max_payload.
        return max(128 * 1024, min(self.nc.max_payload, 8 * 1024 * 1024) - 4096)

    async def get_file(self, name: str, destination: Path, *, sha256: str | None = None) -> Path:
        """Fetch a staged object into `destination`, verifying its sha256 when given."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".part")
        try:
            with partial.open("wb") as handle:
                async with contextlib.aclosing(self.read_object(name, sha256=sha256)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(handle.write, chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(destination)
        return destination

    async def read_object(self, name: str, *, sha256: str | None = None) -> AsyncGenerator[bytes, None]:
        """Yield a staged object's bytes chunk by chunk; after the last one, check they hash to `sha256`
        (default: the digest the object store recorded) and raise instead of finishing if not.

        `NotFoundError` when there is no such object; `PermanentError` when its bytes are not the
        expected ones; `TransientError` when the read broke off (retry it). A caller that acts on the
        bytes (an upload) must only commit once the iteration has ended without an error.
        """
        store = await self.object_store()
        info = await store.get_info(name)
        if info.is_link():
            raise PermanentError(f"staged object {name} is a link; links are not staged by Visionyard")
        expected = sha256 or _hex_digest(info.digest)
        digest = hashlib.sha256()
        size = 0
        if info.size:
            chunk_size = info.options.max_chunk_size if info.options and info.options.max_chunk_size else 128 * 1024
            chunks = self._object_chunks(name, info.nuid, chunk_size=chunk_size)
            async with contextlib.aclosing(chunks) as reader:
                async for chunk in reader:
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
        if size != (info.size or 0):
            raise TransientError(f"staged object {name}: read {size} of {info.size} bytes")
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise PermanentError(f"staged object {name} has sha256 {actual}, expected {expected}")

    async def read_incoming(self, object_id: str, size: int) -> AsyncGenerator[bytes, None]:
        """Yield the chunks `put_file(..., object_id=object_id)` is putting, as they are stored, until
        `size` bytes have come: a copy can run alongside the put instead of after it.

        Nothing here says the bytes are the object's: the put may still fail (its chunks are then
        purged and this read stalls, `TransientError`) or be of another file. Check them against the
        object's digest before acting on them.
        """
        if size <= 0:
            return
        read = 0
        chunks = self._object_chunks(object_id, object_id, chunk_size=self._chunk_size(), until_bytes=size)
        async with contextlib.aclosing(chunks) as reader:
            async for chunk in reader:
                read += len(chunk)
                if read > size:
                    raise TransientError(f"incoming object {object_id}: more than the {size} bytes announced")
                yield chunk

    async def _object_chunks(
        self, name: str, object_id: str, *, chunk_size: int, until_bytes: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The chunks stored under `object_id`, in order: those there now (`until_bytes` None), or
        waiting for more until `until_bytes` have come."""
        # nats-py's `ObjectStore.get` reads through an ordered push consumer whose flow-control
        # replies it polls every 0.25 s: profiled at ~60 MB/s (nats-py issue #703). A pull consumer of
        # our own on the object's chunk subject, fetching a window at a time, reads ~5x faster.
        bucket = streams.OBJECT_STAGING
        stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        consumer = f"read-{uuid.uuid4().hex}"
        await self.js.add_consumer(stream, config=api.ConsumerConfig(
            name=consumer,
            filter_subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=object_id),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            # Removed in `finally`; the threshold only cleans up after a reader that died.
            inactive_threshold=300.0,
        ))
        batch = max(1, OBJECT_READ_WINDOW // chunk_size)
        subscription = await self.js.pull_subscribe_bind(consumer=consumer, stream=stream)
        try:
            delivered = received = 0
            while True:
                try:
                    messages = await subscription.fetch(batch, timeout=OBJECT_READ_STALL_SECONDS)
                except (NatsTimeoutError, TimeoutError) as error:
                    raise TransientError(f"reading staged object {name} stalled after {delivered} chunks") from error
                for msg in messages:
                    metadata = msg.metadata
                    delivered += 1
                    # Chunks must arrive in order and without a gap, or the bytes are not the object.
                    if metadata.sequence.consumer != delivered:
                        raise TransientError(f"reading staged object {name}: chunk {delivered} missing")
                    received += len(msg.data)
                    yield msg.data
                    if until_bytes is None and metadata.num_pending == 0:
                        return
                    if until_bytes is not None and received >= until_bytes:
                        return
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, consumer)

    async def has_object(self, name: str) -> bool:
        """Whether the staging object store holds `name`."""
        store = await self.object_store()
        try:
            info = await store.get_info(name)
        except NotFoundError:
            return False
        except Exception:
            return False
        return not getattr(info, "deleted", False)


def _hex_digest(digest: str | None) -> str | None:
    """The hex sha256 of an object store digest (`SHA-256=<urlsafe base64>`), None if not one."""
    if not digest or not digest.upper().startswith("SHA-256="):
        return None
    encoded = digest[len("SHA-256="):]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
