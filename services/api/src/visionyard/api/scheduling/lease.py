"""Which API replica schedules: a lease in the `sched_leader` KV bucket, whose TTL expires it.

Any number of API replicas run `SchedulerRuntime`; exactly one holds the lease and decides. Acquiring is
a KV `create` (stored only if the key is absent: expired, released or never taken), renewing an `update`
checked against the revision the holder last wrote, so a holder that lost the key (it expired while the
holder was cut off, and another replica created it) learns so at its next renewal and steps down.

A holder decides only while `valid()`: until `ttl - ttl/3` after it *sent* its last successful renewal.
The server expires the key no earlier than `ttl` after it *stored* that renewal, and a replica can take
the key only after that, so a paused or partitioned ex-holder has stopped deciding before anyone else
starts (with clocks that run at the same rate; no wall-clock agreement is needed). Even so, nothing
relies on the lease alone for safety: each admission is a revision-checked write of that job's record,
so two deciders can never both admit one attempt (`scheduler.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from visionyard.shared.scheduling import LEADER_KEY

log = logging.getLogger("visionyard.api.scheduling.lease")


class LeaseTaken(Exception):
    """The lease key is not at the revision its holder wrote: it expired, and maybe another replica holds it."""


class LeaseStore(Protocol):
    """The lease key's bucket."""

    async def create(self, key: str, value: bytes) -> int:
        """Store `value` only if `key` is absent; its revision. Raises when the key exists."""
        ...

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Store `value` only if the key's revision is `last`; its new revision. LeaseTaken otherwise."""
        ...

    async def delete(self, key: str, last: int) -> bool:
        """Delete the key if its revision is `last`."""
        ...


class Lease:
    """One replica's claim on the scheduler lease."""

    def __init__(self, store: LeaseStore, *, holder: str, ttl: float) -> None:
        self._store = store
        self.holder = holder
        self.ttl = ttl
        self._revision: int | None = None
        self._valid_until = 0.0

    @property
    def renew_every(self) -> float:
        """How often the holder renews."""
        return self.ttl / 3

    def held(self) -> bool:
        """Whether this replica believes it holds the lease."""
        return self._revision is not None

    def valid(self) -> bool:
        """Whether this replica may decide now."""
        return self._revision is not None and time.monotonic() < self._valid_until

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            sent = time.monotonic()
            try:
                self._revision = await self._store.create(LEADER_KEY, self.holder.encode())
                self._valid_until = sent + self.ttl - self.renew_every
                log.info("scheduler lease acquired", extra={"holder": self.holder})
                return True
            except Exception as error:  # held by another replica, or the broker is away
                log.debug("scheduler lease not acquired: %s", error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_every):
                    await stop.wait()
        return False

    async def keep(self) -> None:
        """Renew until the lease is lost (returns): taken by another replica after it expired, or unrenewable
        for a whole period (the broker is away; the holder has stopped deciding by then)."""
        while self._revision is not None:
            await asyncio.sleep(self.renew_every)
            sent = time.monotonic()
            try:
                self._revision = await self._store.update(LEADER_KEY, self.holder.encode(), last=self._revision)
                self._valid_until = sent + self.ttl - self.renew_every
            except Exception as error:
                if isinstance(error, LeaseTaken) or time.monotonic() >= self._valid_until:
                    log.warning("scheduler lease lost: %s", error, extra={"holder": self.holder})
                    self._revision = None
                    return
                log.info("scheduler lease not renewed, retrying: %s", error)

    async def release(self) -> None:
        """Give the lease up at once (a clean shutdown), so another replica need not wait for it to expire."""
        revision, self._revision = self._revision, None
        self._valid_until = 0.0
        if revision is None:
            return
        with contextlib.suppress(Exception):
            await self._store.delete(LEADER_KEY, last=revision)
