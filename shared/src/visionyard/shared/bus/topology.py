"""Declaring what the services share: streams, consumers, KV buckets and the staging object store.
"""

from __future__ import annotations

from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from visionyard.shared import permissions, streams
from visionyard.shared.bus.core import BusCore
from visionyard.shared.config import TopologySettings


class Topology(BusCore):
    """Idempotent declarations; a permissioned user declares only its own part."""

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
