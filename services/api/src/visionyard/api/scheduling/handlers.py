"""The scheduler's runtime in each API replica: stand for the lease, and while holding it, lead.

Leading is a handful of loops over one `Scheduler` (a fresh one per term, rebuilt from KV): apply KV
changes, consume the `api-scheduler` events, admit while slots are free, write where waiting jobs stand,
and collect old records. If any of them fails (the broker went away, a record conflict says another
replica decides), the term ends: the lease is given up, everything is read again from KV, and the replica
stands for the lease again. Only KV and the streams carry state from one term to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

from visionyard.api.adapters.scheduling_kv import BusCommandSender, KvLeaseStore, KvSchedulerStore
from visionyard.api.ports import Delivered
from visionyard.api.scheduling.lease import Lease
from visionyard.api.scheduling.scheduler import (
    PURGE_EVERY_SECONDS,
    STATUS_REFRESH_SECONDS,
    CommandSender,
    RunnerEvent,
    Scheduler,
)
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus, TransientError
from visionyard.shared.bus.broker import Batch, ServiceBroker, consumer_subscriber, feed
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.api.scheduling")

# After a failed term, the pause before standing for the lease again.
RETRY_SECONDS = 1.0
# Positions are recomputed at most this often, or (with many waiting jobs) at most every 5× the time it took.
MIN_STATUS_INTERVAL = 0.5
COLLECT_EVERY_SECONDS = 60.0


def default_scheduler_id() -> str:
    """This replica's name in the lease and in records: host and pid."""
    return f"api-{socket.gethostname()}-{os.getpid()}"


class SchedulerRuntime:
    """Stands for the scheduler lease until stopped; leads while it holds it."""

    def __init__(self, bus: Bus, *, scheduler_id: str | None = None, lease_seconds: float = streams.SCHED_LEASE_SECONDS,
                 batch: int = 200, sender: CommandSender | None = None, lookahead_seconds: float = 0.5) -> None:
        self._bus = bus
        self._lookahead_seconds = lookahead_seconds
        self._sender = sender or BusCommandSender(bus)
        self.scheduler_id = scheduler_id or default_scheduler_id()
        self.lease = Lease(KvLeaseStore(bus), holder=self.scheduler_id, ttl=lease_seconds)
        self._batch = batch
        self.batch = batch
        self.current: Scheduler | None = None
        self.terms = 0
        # The FastStream subscriber of the `api-scheduler` consumer (`subscribe`), fed during each term.
        self._subscriber: Any = None
        self._term: tuple[Scheduler, asyncio.Event, list[Exception]] | None = None

    async def feed(self, bus: Bus, subscriber: Any, halt: asyncio.Event) -> None:
        """The broker's `Feeder` of the scheduler subscriber: stand for the lease until `halt`; while leading,
        hand the subscriber the `api-scheduler` consumer's events."""
        self._subscriber = subscriber
        await self.run(halt)

    async def on_runner_events(self, batch: Batch) -> None:
        """Runners' `started` and terminal events (`api-scheduler`): free and fill slots in the current term.

        A failure ends the term: the book has moved on but KV may not have (a record left `admitted`), so the
        events come back (nak'ed) to a scheduler that rebuilt its book from KV.
        """
        if self._term is None:
            raise TransientError("no scheduler term is running")
        scheduler, term_over, failed = self._term
        events = [parsed for msg in batch.raw_message if (parsed := _runner_event(msg)) is not None]
        try:
            await scheduler.on_events(events)
        except Exception as error:
            failed.append(error)
            term_over.set()
            raise

    async def run(self, stop: asyncio.Event) -> None:
        """Stand for the lease and lead, term after term, until `stop`."""
        while not stop.is_set():
            try:
                if not await self.lease.acquire(stop):
                    return
                self.terms += 1
                await self._lead(stop)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("scheduler term ended: %s", error, extra={"scheduler": self.scheduler_id})
            finally:
                self.current = None
                await self.lease.release()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_SECONDS):
                        await stop.wait()

    async def _lead(self, stop: asyncio.Event) -> None:
        store = KvSchedulerStore(self._bus)
        scheduler = Scheduler(store=store, sender=self._sender, scheduler_id=self.scheduler_id,
                              lookahead_seconds=self._lookahead_seconds)
        term_over = asyncio.Event()
        try:
            initial = await store.open()
            await scheduler.take_over(initial)
            self.current = scheduler
            loops = [
                asyncio.create_task(self.lease.keep(), name="sched-lease"),
                asyncio.create_task(self._follow(store, scheduler), name="sched-follow"),
                asyncio.create_task(self._consume_events(scheduler, term_over), name="sched-events"),
                asyncio.create_task(self._admit(scheduler), name="sched-admit"),
                asyncio.create_task(scheduler.delete_requests(), name="sched-delete-requests"),
                asyncio.create_task(self._report(scheduler), name="sched-status"),
                asyncio.create_task(self._housekeep(scheduler, store), name="sched-housekeeping"),
                asyncio.create_task(stop.wait(), name="sched-stop"),
            ]
            try:
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            finally:
                term_over.set()
                await cancel_all(loops)
                results = await asyncio.gather(*loops, return_exceptions=True)
            for task, result in zip(loops, results, strict=True):
                if task in done and isinstance(result, Exception):
                    raise result
            if not stop.is_set():
                raise RuntimeError("the scheduler lease was lost")
        finally:
            await store.close()

    async def _follow(self, store: KvSchedulerStore, scheduler: Scheduler) -> None:
        while True:
            await scheduler.apply(await store.next_change())

    async def _consume_events(self, scheduler: Scheduler, term_over: asyncio.Event) -> None:
        if self._subscriber is None:
            raise RuntimeError("the scheduler runs as its broker's feeder: scheduling.handlers.subscribe")
        failed: list[Exception] = []
        subscriber = self._subscriber

        async def hand_over(messages: list[Any]) -> None:
            await subscriber.consume(messages)

        self._term = (scheduler, term_over, failed)
        try:
            await self._bus.pull_loop(streams.API_SCHEDULER, hand_over, stop=term_over, batch=self._batch)
        finally:
            self._term = None
        if failed:
            raise failed[0]

    async def _admit(self, scheduler: Scheduler) -> None:
        while True:
            await scheduler.wake.wait()
            scheduler.wake.clear()
            await scheduler.admit_ready(may_decide=self.lease.valid)
            if not self.lease.valid() and scheduler.book.waiting:
                # Renewal is late (a slow broker): look again once it went through.
                await asyncio.sleep(self.lease.renew_every / 4)
                scheduler.wake.set()

    async def _report(self, scheduler: Scheduler) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_REFRESH_SECONDS):
                    await scheduler.status_changed.wait()
            scheduler.status_changed.clear()
            took = await scheduler.write_status()
            await asyncio.sleep(max(MIN_STATUS_INTERVAL, 5 * took))

    async def _housekeep(self, scheduler: Scheduler, store: KvSchedulerStore) -> None:
        purged_at = time.monotonic()
        while True:
            await asyncio.sleep(COLLECT_EVERY_SECONDS)
            # Runners that stopped renewing their advertisement no longer count: positions change.
            scheduler.status_changed.set()
            scheduler.wake.set()
            collected = await scheduler.collect_done_records()
            if collected:
                log.info("collected finished admission records", extra={"count": collected})
            if time.monotonic() - purged_at > PURGE_EVERY_SECONDS:
                await store.purge_deleted()
                purged_at = time.monotonic()


def subscribe(broker: ServiceBroker, runtime: SchedulerRuntime) -> None:
    """Declare the scheduler's subscriber on `broker`, fed by `runtime` while it holds the lease."""
    router_subscriber = consumer_subscriber(
        broker, streams.API_SCHEDULER, batched=True, batch=runtime.batch,
        description="Runners' started and terminal events: free and fill slots (the lease holder only)",
    )
    router_subscriber(runtime.on_runner_events)
    feed(broker, router_subscriber, runtime.feed)


def _runner_event(msg: Delivered) -> RunnerEvent | None:
    kind = subjects.job_event_kind(msg.subject)
    if kind not in ("started", "completed", "failed", "cancelled"):
        return None
    try:
        raw = json.loads(msg.data)
        return RunnerEvent(kind=kind, job_id=str(raw["job_id"]), attempt=int(raw["attempt"]))  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        log.warning("undecodable event for the scheduler", extra={"subject": msg.subject})
        return None
