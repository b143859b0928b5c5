"""The one NATS/JetStream adapter every service uses.

It publishes with a message id and awaits the PubAck (so a retried publish is stored once), runs
durable pull consumers with explicit acks (each loop keeping one pull request standing on the server,
`_StandingPull`), and holds the one place that maps a handler's error to
an ack decision: a permanent error is dead-lettered and terminated, anything else is nak'ed with a
backoff that grows with the delivery count, and the last allowed delivery is dead-lettered rather
than silently dropped.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT, KeyValue
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from nats.nuid import NUID
from opentelemetry.trace import SpanKind
from pydantic import BaseModel

from visionyard.shared import metrics, permissions, streams, subjects, tracing
from visionyard.shared.config import TopologySettings, nats_url_user, server_urls
from visionyard.shared.messages import Message

log = logging.getLogger("visionyard.bus")


class PermanentError(Exception):
    """The message can never succeed (bad payload, violated invariant): dead-letter it now."""


class TransientError(Exception):
    """A dependency is unavailable; retry the message later."""


class AckAction(StrEnum):
    """What to tell JetStream about a delivered message."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass(frozen=True)
class AckDecision:
    """An ack action, with the redelivery delay of a nak and whether to dead-letter first."""

    action: AckAction
    delay: float = 0.0
    dead_letter: bool = False


def decide_ack(error: BaseException | None, *, delivered: int, spec: streams.ConsumerSpec) -> AckDecision:
    """Map a handler outcome to an ack decision; the only place that does so."""
    if error is None:
        return AckDecision(AckAction.ACK)
    if isinstance(error, PermanentError):
        return AckDecision(AckAction.TERM, dead_letter=True)
    if spec.max_deliver > 0 and delivered >= spec.max_deliver:
        return AckDecision(AckAction.TERM, dead_letter=True)
    delay = min(spec.backoff_base * (2 ** max(delivered - 1, 0)), spec.backoff_cap)
    return AckDecision(AckAction.NAK, delay=delay)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Durable consumers keep a pull request standing on the server instead of fetching per batch.
# nats-py's `fetch` held a lone message until the fetch's deadline (a quiet system's job events
# reached the API ~1 s late), and cost 2-3 pull requests and ~2 408 replies per event at a few
# events/s (nats-server `/varz`: ~6 messages in and out per job event). A standing request hands a
# message over as it arrives; an idle consumer renews its request once per `PULL_EXPIRES`. 15 s
# keeps that to a request and its 408 per 15 s per consumer, while a request lost without any
# signal to the client (no reconnect, no status) is renewed within 15 s + `PULL_GRACE_SECONDS`.
PULL_EXPIRES = 15.0
# How late a request's expiry (408) may be before the request is taken for lost.
PULL_GRACE_SECONDS = 2.0
# How often a consume loop checks for a reconnect (which loses its requests if the server restarted).
PULL_WATCH_SECONDS = 1.0
# The pause before asking again after a refused request (409, 503) or a failed publish.
PULL_RETRY_SECONDS = 0.5
# The server's count of a request's messages it will no longer send (on a 408).
PENDING_MESSAGES_HEADER = "Nats-Pending-Messages"

# How many bytes of an object's chunks one pull asks for while reading it.
OBJECT_READ_WINDOW = 16 * 1024 * 1024
# A read that gets nothing for this long has broken off (the broker went away); it is retried whole.
OBJECT_READ_STALL_SECONDS = 10.0
# How many of an object's chunks a put has sent before it awaits the oldest one's PubAck.
OBJECT_PUT_IN_FLIGHT = 8
# How long a put waits for one chunk's PubAck.
OBJECT_PUT_ACK_SECONDS = 30.0

MessageHandler = Callable[[Msg], Awaitable[None]]
BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class Bus:
    """A connection to NATS with JetStream, and the operations services need on it."""

    def __init__(self, nc: NatsClient, *, service: str, access: permissions.ServiceAccess | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10.0)
        self.service = service
        # The NATS user's permitted part of the topology (None: a user allowed everything).
        self.access = access
        self._object_store: ObjectStore | None = None
        self._kv: dict[str, KeyValue] = {}
        self._nuid = NUID()
        # How long each standing pull request of a consume loop lives (tests shorten it).
        self.pull_expires = PULL_EXPIRES
        # The replicas `ensure_topology` declared with: a KV bucket or the object store created later, on
        # first use, gets the same (on a cluster, an R1 bucket would die with its one node).
        self.replicas = 1

    @classmethod
    async def connect(cls, url: str, *, service: str, user: str | None = None, password: str | None = None,
                      **options: Any) -> Bus:
        """Connect and keep reconnecting for ever: an outage costs latency, never the process.

        `url` may list a cluster's servers separated by commas (as the compose file and manifests do).
        The NATS user is `user` or the one the URL names; if it is one of `permissions.ACCESS`, replies
        come to that user's own inbox prefix (its permissions allow no other) and `ensure_topology`
        declares only that user's part.
        """
        async def on_error(error: Exception) -> None:
            log.warning("nats error: %s", error, extra={"service": service})

        named = user or nats_url_user(url)
        access = permissions.ACCESS.get(named) if named else None
        if access is not None:
            options.setdefault("inbox_prefix", access.inbox_prefix)
        if user:
            options.update(user=user, password=password or "")
        options.setdefault("error_cb", on_error)
        nc = await nats.connect(
            server_urls(url),
            name=service,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            allow_reconnect=True,
            **options,
        )
        return cls(nc, service=service, access=access)

    async def close(self) -> None:
        """Drain (so buffered publishes reach the server) and close."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # pragma: no cover - best effort on shutdown
                await self.nc.close()

    # -- topology --------------------------------------------------------------------------------

    async def ensure_topology(self, *, replicas: int = 1, ack_waits: dict[str, float] | None = None) -> None:
        """Declare every stream, consumer, KV bucket and the staging object store (idempotent).

        `ack_waits` (by durable name; default: `TopologySettings`) tunes consumers' ack waits.
        """
        if ack_waits is None:
            ack_waits = TopologySettings().ack_waits
        self.replicas = replicas
        access = self.access
        # A permissioned user declares only its part; the owner of each piece declares it (any may start first).
        declared = permissions.declared_streams(access) if access else streams.STREAMS
        for spec in declared:
            config = streams.stream_config(spec, replicas=replicas)
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)
        for consumer in access.consumers if access else streams.CONSUMERS:
            if consumer.durable in ack_waits:
                await self.declare_consumer(streams.with_ack_wait(consumer, ack_waits[consumer.durable]))
            else:
                await self.js.add_consumer(consumer.stream, config=await self._preserving_ack_wait(consumer))
        for bucket in permissions.kv_buckets(access) if access else streams.KV_BUCKETS:
            await self.kv(bucket, replicas=replicas)
        if access is None or access.object_store:
            await self.object_store(replicas=replicas)

    async def _preserving_ack_wait(self, spec: streams.ConsumerSpec) -> api.ConsumerConfig:
        # A tuned ack wait (`declare_consumer`, `TopologySettings`) must survive a service that declares
        # the topology without the tuning, or failover timing would flap with every restart.
        config = streams.consumer_config(spec)
        try:
            info = await self.js.consumer_info(spec.stream, spec.durable)
        except NotFoundError:
            return config
        if info.config.ack_wait:
            config.ack_wait = info.config.ack_wait
        return config

    async def declare_consumer(self, spec: streams.ConsumerSpec) -> None:
        """Create or update one consumer exactly as `spec` says (its owner tuning e.g. the ack wait)."""
        await self.js.add_consumer(spec.stream, config=streams.consumer_config(spec))

    async def consumer_ack_wait(self, spec: streams.ConsumerSpec) -> float:
        """The ack wait the consumer really has (it may be tuned), in seconds."""
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return float(info.config.ack_wait or spec.ack_wait)

    async def kv(self, bucket: str, *, replicas: int | None = None) -> KeyValue:
        """A KV bucket, created on first use (with `replicas`, default the topology's)."""
        if bucket not in self._kv:
            try:
                self._kv[bucket] = await self.js.key_value(bucket)
            except Exception:
                self._kv[bucket] = await self.js.create_key_value(
                    api.KeyValueConfig(bucket=bucket, history=1, replicas=replicas or self.replicas,
                                       ttl=streams.KV_TTLS.get(bucket))
                )
        return self._kv[bucket]

    async def object_store(self, *, replicas: int | None = None) -> ObjectStore:
        """The staging object store, created on first use (with `replicas`, default the topology's)."""
        if self._object_store is None:
            try:
                self._object_store = await self.js.object_store(streams.OBJECT_STAGING)
            except Exception:
                self._object_store = await self.js.create_object_store(
                    streams.OBJECT_STAGING,
                    config=api.ObjectStoreConfig(
                        ttl=streams.OBJECT_STAGING_TTL,
                        storage=api.StorageType.FILE,
                        replicas=replicas or self.replicas,
                    ),
                )
        return self._object_store

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, message: Message, *, subject: str | None = None) -> api.PubAck:
        """Publish a message to JetStream, de-duplicated by its `message_id`, awaiting the PubAck."""
        target = subject or _subject_of(message)
        return await self.publish_raw(target, message.to_bytes(), message_id=message.message_id)

    async def publish_raw(
        self, subject: str, data: bytes, *, message_id: str, headers: dict[str, str] | None = None
    ) -> api.PubAck:
        """Publish bytes to JetStream with `Nats-Msg-Id`, awaiting the PubAck."""
        all_headers = {"Nats-Msg-Id": message_id, **(headers or {})}
        if tracing.enabled() and tracing.TRACEPARENT not in all_headers:  # an outbox row keeps its request's
            all_headers = tracing.inject(all_headers)
        return await self.js.publish(subject, data, headers=all_headers)

    async def publish_ordered(self, messages: Sequence[Message], *, timeout: float = 10.0) -> int:
        """Publish messages in order, all sent before any PubAck is awaited; how many leading ones were acked.

        The acks are checked in order and counting stops at the first failure, so a caller retries
        from there (whatever was stored after it is de-duplicated by `message_id`): one round trip
        per window instead of one per message.
        """
        futures: list[asyncio.Future[api.PubAck]] = []
        trace_headers = tracing.inject() if tracing.enabled() else {}
        try:
            for message in messages:
                futures.append(
                    await self.js.publish_async(
                        _subject_of(message), message.to_bytes(),
                        headers={"Nats-Msg-Id": message.message_id, **trace_headers},
                    )
                )
        except Exception as error:  # not even sent (disconnected): count what was
            log.warning("ordered publish stopped after sending %d of %d: %s", len(futures), len(messages), error)
        acked = 0
        for future in futures:
            try:
                await asyncio.wait_for(future, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("ordered publish: %d of %d acknowledged, then %s", acked, len(messages), error)
                break
            acked += 1
        for future in futures[acked:]:
            future.cancel()  # frees its slot; the caller sends it again
        return acked

    # -- files -----------------------------------------------------------------------------------

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
                mtime=datetime.now(timezone.utc).isoformat(),
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

    async def read_object(self, name: str, *, sha256: str | None = None) -> AsyncIterator[bytes]:
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

    async def read_incoming(self, object_id: str, size: int) -> AsyncIterator[bytes]:
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
    ) -> AsyncIterator[bytes]:
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
                except (NatsTimeoutError, asyncio.TimeoutError) as error:
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

    # -- request-reply ---------------------------------------------------------------------------

    async def request(self, subject: str, payload: BaseModel, *, timeout: float = 10.0) -> bytes:
        """Core request-reply; raises `TransientError` when nobody answers in time."""
        try:
            reply = await self.nc.request(subject, payload.model_dump_json().encode(), timeout=timeout,
                                          headers=tracing.inject() if tracing.enabled() else None)
        except (NatsTimeoutError, nats.errors.NoRespondersError) as error:
            raise TransientError(f"no reply on {subject}: {type(error).__name__}") from error
        return reply.data

    async def notify(self, subject: str, payload: BaseModel) -> None:
        """Core NATS publish, no reply and no storage: a hint whose loss costs time, never data."""
        await self.nc.publish(subject, payload.model_dump_json().encode())

    async def listen(self, subject: str, handler: Callable[[bytes], Awaitable[None]], *, queue: str) -> Any:
        """Take `notify` hints on `subject` as one member of a queue group; a failing handler is logged."""

        async def on_hint(msg: Msg) -> None:
            try:
                await handler(msg.data)
            except Exception:
                log.exception("hint handler failed", extra={"subject": subject})

        return await self.nc.subscribe(subject, queue=queue, cb=on_hint)

    async def serve(
        self, subject: str, handler: Callable[[bytes], Awaitable[bytes]], *, queue: str
    ) -> Any:
        """Answer requests on `subject` as one member of a queue group (so replicas share load)."""

        async def on_request(msg: Msg) -> None:
            try:
                with tracing.span(f"serve {subject}", headers=msg.headers, kind=SpanKind.SERVER, subject=subject):
                    answer = await handler(msg.data)
            except Exception as error:  # the caller gets the reason instead of a time-out
                log.exception("request handler failed", extra={"subject": subject})
                answer = _error_reply(error)
            await msg.respond(answer)

        return await self.nc.subscribe(subject, queue=queue, cb=on_request)

    # -- consuming -------------------------------------------------------------------------------

    async def consume(
        self,
        spec: streams.ConsumerSpec,
        handler: MessageHandler,
        *,
        stop: asyncio.Event,
        batch: int = 100,
    ) -> None:
        """Pull from a durable consumer until `stop` is set, one handler call per message."""

        latency = metrics.HANDLER_SECONDS.labels(spec.durable)

        async def each(messages: list[Msg]) -> None:
            for msg in messages:
                started = time.perf_counter()
                with tracing.span(f"consume {spec.durable}", headers=msg.headers, kind=SpanKind.CONSUMER,
                                  subject=msg.subject):
                    outcome = await _outcome(handler(msg))
                latency.observe(time.perf_counter() - started)
                await self._settle(msg, spec, outcome)

        await self._pull_loop(spec, each, stop=stop, batch=batch)

    async def consume_batches(
        self,
        spec: streams.ConsumerSpec,
        handler: BatchHandler,
        *,
        stop: asyncio.Event,
        batch: int = 500,
        linger: float = 0.0,
    ) -> None:
        """Pull from a durable consumer until `stop` is set, one handler call per batch.

        A batch is what has arrived by the time the handler is free, up to `batch` messages. The
        handler settles poison messages itself (with `dead_letter`); if it raises, every message of
        the batch is nak'ed with backoff, so a batch is applied all-or-nothing.
        With `linger` > 0, a partial batch waits up to that many seconds for more messages before
        the handler sees it: for a handler whose cost is per call rather than per message (one
        MLflow `log_batch` per call), a trickle of events then costs one call per `linger`
        instead of one per event. Messages stay unacknowledged meanwhile (`linger` ≪ ack wait).
        """

        latency = metrics.HANDLER_SECONDS.labels(spec.durable)

        async def whole(messages: list[Msg]) -> None:
            started = time.perf_counter()
            with tracing.spans_per_trace(f"consume {spec.durable}", [msg.headers for msg in messages] if tracing.enabled() else []):
                error = await _outcome(handler(messages))
            latency.observe(time.perf_counter() - started)
            for msg in messages:
                if not msg.is_acked:
                    await self._settle(msg, spec, error)

        await self._pull_loop(spec, whole, stop=stop, batch=batch, linger=linger)

    async def _pull_loop(
        self,
        spec: streams.ConsumerSpec,
        on_messages: Callable[[list[Msg]], Awaitable[None]],
        *,
        stop: asyncio.Event,
        batch: int,
        linger: float = 0.0,
    ) -> None:
        pull = _StandingPull(
            self.nc,
            f"{self.js._prefix}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
            durable=spec.durable,
            batch=batch,
            expires=self.pull_expires,
        )
        await pull.start(stop)
        metrics.CONSUMERS.track(self, spec)
        try:
            while not stop.is_set():
                messages = await pull.take(linger=linger)
                if not messages:
                    continue
                try:
                    await on_messages(messages)
                except Exception as error:  # settling failed (broker away): ack_wait redelivers the rest
                    log.warning("handling a batch from %s failed: %s", spec.durable, error)
                    await asyncio.sleep(PULL_RETRY_SECONDS)
                finally:
                    pull.release(len(messages))
        finally:
            metrics.CONSUMERS.untrack(self, spec)
            await pull.close()

    async def _settle(self, msg: Msg, spec: streams.ConsumerSpec, error: BaseException | None) -> None:
        # Only a failure's decision depends on the delivery count: parsing it from every acked
        # message's reply subject was a visible share of a busy consumer's time (profiled).
        delivered = msg.metadata.num_delivered if error is not None and msg.metadata else 1
        decision = decide_ack(error, delivered=delivered, spec=spec)
        if error is not None:
            metrics.HANDLER_FAILURES.labels(spec.durable, decision.action.value).inc()
            log.warning(
                "handler failed: %s -> %s",
                error,
                decision.action,
                extra={"subject": msg.subject, "delivery": delivered, "consumer": spec.durable},
            )
        if decision.dead_letter:
            await self.dead_letter(msg, consumer=spec.durable, reason=str(error))
        try:
            if decision.action is AckAction.ACK:
                await msg.ack()
            elif decision.action is AckAction.TERM:
                await msg.term()
            else:
                await msg.nak(delay=decision.delay)
        except Exception as settle_error:  # the broker will redeliver after ack_wait
            log.warning("could not settle message: %s", settle_error)

    async def dead_letter(self, msg: Msg, *, consumer: str, reason: str) -> None:
        """Park a poison message in the DEADLETTERS stream, keeping its subject and the reason."""
        stream_seq = msg.metadata.sequence.stream if msg.metadata else 0
        await self.publish_raw(
            subjects.dead_letter(consumer),
            msg.data,
            message_id=f"dlq-{consumer}-{stream_seq}",
            headers={
                "Visionyard-Original-Subject": msg.subject,
                "Visionyard-Reason": reason[:1000],
                "Visionyard-Stream-Seq": str(stream_seq),
            },
        )


class _StandingPull:
    """One consume loop's pull requests, kept standing on the server, and what they delivered.

    Flow control as nats.go's `Consume`: the messages requested but not yet delivered plus those
    delivered but not yet handled never exceed `batch`, and a new request asks for the difference
    once that is half a batch. So nothing is pulled for a handler still busy with a whole batch (a
    checkpoint upload with `batch` 1): another replica takes the next message instead of it waiting
    in this client for the handler, its ack wait running.
    """

    def __init__(self, nc: NatsClient, next_subject: str, *, durable: str, batch: int, expires: float) -> None:
        self._nc = nc
        self._next_subject = next_subject
        self._durable = durable
        self._batch = batch
        self._threshold = max(1, batch // 2)
        self._expires_ns = int(expires * 1e9)
        self._lost_after = expires + PULL_GRACE_SECONDS
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._delivered: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        # Messages asked for and not yet delivered; delivered and not yet handled.
        self._owed = 0
        self._held = 0
        # When the server last answered (or was last asked), and the client's reconnect count then.
        self._heard = 0.0
        self._reconnects = 0
        self._retry_at = 0.0

    async def start(self, stop: asyncio.Event) -> None:
        """Subscribe to the inbox and start keeping a request standing."""
        self._stop = stop
        self._subscription = await self._nc.subscribe(
            self._inbox,
            cb=self._on_inbox,
            pending_msgs_limit=DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        )
        watcher = asyncio.create_task(stop.wait())
        watcher.add_done_callback(lambda _: self._arrived.set())
        self._tasks = [watcher, asyncio.create_task(self._keep_requesting(), name=f"pull-{self._durable}")]

    async def take(self, *, linger: float) -> list[Msg]:
        """The next messages for the handler, at most `batch`; empty once `stop` is set.

        Waits for the first; takes whatever else has arrived without waiting (a lone message is
        handled at once) or, with `linger` > 0, keeps collecting until the batch is full or
        `linger` seconds have passed since the first was taken.
        """
        assert self._stop is not None
        while not self._delivered:
            if self._stop.is_set():
                return []
            self._arrived.clear()
            await self._arrived.wait()
        messages = self._take_delivered(self._batch)
        if linger <= 0:
            return messages
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while len(messages) < self._batch and not self._stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
            messages += self._take_delivered(self._batch - len(messages))
        return messages

    def release(self, handled: int) -> None:
        """`handled` messages have been through the handler: room to ask for more."""
        self._held -= handled
        self._wake.set()

    async def close(self) -> None:
        """Stop requesting, unsubscribe, and nak what was delivered but never handled.

        The nak (no delay) hands those messages to another replica now rather than after the ack wait.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._subscription is not None
        # Draining (unsubscribe, then a round trip) receives what the server sent before it saw the
        # unsubscribe; a plain unsubscribe would drop those, and they would wait out the ack wait.
        # Without interest, the server drops the requests still standing instead of filling them.
        if self._nc.is_connected and not self._nc.is_draining:
            try:
                async with asyncio.timeout(PULL_GRACE_SECONDS):
                    await self._subscription.drain()
            except Exception as error:  # the broker went away meanwhile: so did the requests
                log.info("could not drain the pull inbox of %s: %s", self._durable, error)
        else:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if not self._delivered:
            return
        unhandled = self._take_delivered(len(self._delivered))
        log.info("returning %d unhandled messages of %s", len(unhandled), self._durable)
        with contextlib.suppress(Exception):
            for msg in unhandled:
                await msg.nak()
            await self._nc.flush(timeout=PULL_GRACE_SECONDS)

    def _take_delivered(self, count: int) -> list[Msg]:
        return [self._delivered.popleft() for _ in range(min(count, len(self._delivered)))]

    async def _on_inbox(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        # A JetStream message always has its ack subject as reply; a status (100, 404, 408, 409,
        # 503) never does, and is for this loop only: a handler never sees one.
        status = None if msg.reply else JetStreamContext.is_status_msg(msg)
        if status is None:
            self._owed = max(0, self._owed - 1)
            self._held += 1
            self._delivered.append(msg)
            self._arrived.set()
            return
        if status == api.StatusCode.CONTROL_MESSAGE:
            return
        if status in (api.StatusCode.REQUEST_TIMEOUT, api.StatusCode.NO_MESSAGES):
            # The request ended: whatever of it was not delivered will not be.
            unfilled = (msg.headers or {}).get(PENDING_MESSAGES_HEADER)
            self._owed = max(0, self._owed - int(unfilled)) if unfilled is not None else 0
        else:
            # Refused or dropped (409: too many waiting requests, leadership change, consumer
            # deleted; 503: no JetStream yet after a restart): which request is unknown, so all are
            # taken for lost and asked again after a pause.
            description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
            log.warning("pull request to %s refused: %s %s", self._durable, status, description)
            self._owed = 0
            self._retry_at = self._heard + PULL_RETRY_SECONDS
        self._wake.set()

    async def _keep_requesting(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                await self._request_more(loop.time())
            except Exception as error:  # broker away: ask again after a pause, never stop
                log.warning("pull request to %s failed: %s", self._durable, error)
                self._retry_at = loop.time() + PULL_RETRY_SECONDS
            pause = self._retry_at - loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause if 0 < pause < PULL_WATCH_SECONDS else PULL_WATCH_SECONDS):
                    await self._wake.wait()

    async def _request_more(self, now: float) -> None:
        if now < self._retry_at or not self._nc.is_connected:
            # A request buffered while disconnected could reach a server that has not recovered the
            # consumer yet, and would be counted on top of the one asked after the reconnect.
            return
        reconnected = self._nc.stats["reconnects"] != self._reconnects
        if self._owed and (reconnected or now - self._heard > self._lost_after):
            # A restarted server forgot the requests; one that answered nothing past the expiry lost them.
            log.info("pull requests to %s lost; asking again", self._durable)
            self._owed = 0
        room = self._batch - self._owed - self._held
        if room < self._threshold:
            return
        request = json.dumps({"batch": room, "expires": self._expires_ns}).encode()
        await self._nc.publish(self._next_subject, request, reply=self._inbox)
        self._owed += room
        self._heard = now
        self._reconnects = self._nc.stats["reconnects"]


async def _outcome(awaitable: Awaitable[None]) -> BaseException | None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception as error:
        return error
    return None


def _hex_digest(digest: str | None) -> str | None:
    """The hex sha256 of an object store digest (`SHA-256=<urlsafe base64>`), None if not one."""
    if not digest or not digest.upper().startswith("SHA-256="):
        return None
    encoded = digest[len("SHA-256="):]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()


def _subject_of(message: Message) -> str:
    subject = getattr(message, "subject", None)
    if callable(subject):
        return str(subject())
    if isinstance(subject, str):
        return subject
    raise TypeError(f"{type(message).__name__} has no subject; pass one")


def _error_reply(error: BaseException) -> bytes:
    return json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}).encode()
