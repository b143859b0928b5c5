"""Declaring what the services share: streams, consumers, KV buckets and the staging object store.

Every declaration is asked again while JetStream cannot answer it (`_answered`): a service that starts
while a cluster elects its meta leader, has lost its quorum, or is slow under load waits for it instead of
exiting, up to `TopologySettings.declare_patience` seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError, ServerError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from visionyard.shared import permissions, streams
from visionyard.shared.bus.core import BusCore
from visionyard.shared.config import TopologySettings

log = logging.getLogger("visionyard.bus")
T = TypeVar("T")

# What JetStream says (or fails to say) while it cannot answer yet: no reply within the request timeout
# (no meta leader, a node lost, a loaded machine: seen on CI with 13 processes declaring at R3 on 2
# cores), no responders / 503 (JetStream not up yet), a 5xx such as "insufficient resources" (too few
# peers for the replicas yet), and the 400 a cluster answers while too few of its nodes are up: "no suitable
# peers for placement, peer offline" (err_code 10005, seen with one of three nodes up). Any other 400 (a
# conflicting declaration) or a permissions error is not retried.
NOT_ANSWERING = (NatsTimeoutError, NoRespondersError, ServiceUnavailableError, ServerError,
                 ConnectionReconnectingError)
PEERS_OFFLINE = 10005
# The first pause before asking again; it doubles up to the last.
RETRY_PAUSES = (0.5, 5.0)


class Topology(BusCore):
    """Idempotent declarations; a permissioned user declares only its own part."""

    async def ensure_topology(self, *, replicas: int = 1, ack_waits: dict[str, float] | None = None) -> None:
        """Declare every stream, consumer, KV bucket and the staging object store (idempotent).

        `ack_waits` (by durable name; default: `TopologySettings`) tunes consumers' ack waits.
        """
        settings = TopologySettings()
        if ack_waits is None:
            ack_waits = settings.ack_waits
        self.replicas = replicas
        self.declare_patience = settings.declare_patience
        access = self.access
        # A permissioned user declares only its part; the owner of each piece declares it (any may start first).
        declared = permissions.declared_streams(access) if access else streams.STREAMS
        for spec in declared:
            await self._answered(f"stream {spec.name}", functools.partial(self._declare_stream, spec, replicas))
        for consumer in access.consumers if access else streams.CONSUMERS:
            if consumer.durable in ack_waits:
                await self.declare_consumer(streams.with_ack_wait(consumer, ack_waits[consumer.durable]))
            else:
                await self._answered(f"consumer {consumer.durable}", functools.partial(self._add_consumer, consumer))
        for bucket in permissions.kv_buckets(access) if access else streams.KV_BUCKETS:
            await self._answered(f"KV bucket {bucket}", functools.partial(self.kv, bucket, replicas=replicas))
        if access is None or access.object_store:
            await self._answered("the staging object store", lambda: self.object_store(replicas=replicas))

    async def _answered(self, what: str, declare: Callable[[], Awaitable[T]]) -> T:
        """`declare()`, asked again with a growing pause while JetStream does not answer, for up to
        `declare_patience` seconds; then the last error is raised, naming what was being declared."""
        deadline = time.monotonic() + self.declare_patience
        pause = RETRY_PAUSES[0]
        while True:
            try:
                return await declare()
            except (*NOT_ANSWERING, BadRequestError) as error:
                if isinstance(error, BadRequestError) and error.err_code != PEERS_OFFLINE:
                    raise
                reason = f"{type(error).__name__}: {error}"
                if time.monotonic() + pause > deadline:
                    raise TimeoutError(
                        f"JetStream did not answer declaring {what} within {self.declare_patience:.0f}s "
                        f"(VISIONYARD_TOPOLOGY_DECLARE_PATIENCE); last: {reason}"
                    ) from error
                log.warning("JetStream did not answer declaring %s (%s); asking again in %.1fs", what, reason, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_PAUSES[1])

    async def _declare_stream(self, spec: streams.StreamSpec, replicas: int) -> None:
        config = streams.stream_config(spec, replicas=replicas)
        try:
            await self.js.add_stream(config)
        except BadRequestError as error:
            if error.err_code == PEERS_OFFLINE:
                raise
            await self.js.update_stream(config)

    async def _add_consumer(self, spec: streams.ConsumerSpec) -> None:
        await self.js.add_consumer(spec.stream, config=await self._preserving_ack_wait(spec))

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
        await self._answered(f"consumer {spec.durable}",
                             lambda: self.js.add_consumer(spec.stream, config=streams.consumer_config(spec)))

    async def consumer_ack_wait(self, spec: streams.ConsumerSpec) -> float:
        """The ack wait the consumer really has (it may be tuned), in seconds."""
        info = await self._answered(f"consumer {spec.durable}", lambda: self.js.consumer_info(spec.stream, spec.durable))
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
