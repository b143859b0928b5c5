"""The connection every part of the bus shares: the NATS client, its JetStream context and the user's access.
"""

from __future__ import annotations

import logging
from typing import Any, Self

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

from visionyard.shared import permissions
from visionyard.shared.config import nats_url_user, server_urls

log = logging.getLogger("visionyard.bus")


# Durable consumers keep a pull request standing on the server instead of fetching per batch.
# nats-py's `fetch` held a lone message until the fetch's deadline (a quiet system's job events
# reached the API ~1 s late), and cost 2-3 pull requests and ~2 408 replies per event at a few
# events/s (nats-server `/varz`: ~6 messages in and out per job event). A standing request hands a
# message over as it arrives; an idle consumer renews its request once per `PULL_EXPIRES`. 15 s
# keeps that to a request and its 408 per 15 s per consumer, while a request lost without any
# signal to the client (no reconnect, no status) is renewed within 15 s + `PULL_GRACE_SECONDS`.
PULL_EXPIRES = 15.0


class BusCore:
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
        # How long each request of a standing pull (`pull_loop`) lives (tests shorten it).
        self.pull_expires = PULL_EXPIRES
        # The replicas `ensure_topology` declared with: a KV bucket or the object store created later, on
        # first use, gets the same (on a cluster, an R1 bucket would die with its one node).
        self.replicas = 1
        # How long a declaration waits for JetStream to answer (`Topology._answered`; `ensure_topology` sets it
        # from `TopologySettings`).
        self.declare_patience = 120.0

    @classmethod
    async def connect(cls, url: str, *, service: str, user: str | None = None, password: str | None = None,
                      **options: Any) -> Self:
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

