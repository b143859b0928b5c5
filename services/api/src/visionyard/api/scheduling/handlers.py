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

from nats.aio.msg import Msg

from visionyard.api.adapters.scheduling_kv import BusCommandSender, KvLeaseStore, KvSchedulerStore
from visionyard.api.scheduling.lease import Lease
from visionyard.api.scheduling.scheduler import (
    PURGE_EVERY_SECONDS,
    STATUS_REFRESH_SECONDS,
    CommandSender,
    RunnerEvent,
    Scheduler,
)
from visionyard.shared import streams
from visionyard.shared.bus import Bus

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
        self.current: Scheduler | None = None
        self.terms = 0

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
                for task in loops:
                    task.cancel()
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
        failed: list[Exception] = []

        async def handle(messages: list[Msg]) -> None:
            events = []
            for msg in messages:
                parsed = _runner_event(msg)
                if parsed is not None:
                    events.append(parsed)
            try:
                await scheduler.on_events(events)
            except Exception as error:
                # The book has moved on but KV may not have (a record left `admitted`): end the term, so the
                # events come back (nak'ed) to a scheduler that rebuilt its book from KV.
                failed.append(error)
                term_over.set()
                raise

        await self._bus.consume_batches(streams.API_SCHEDULER, handle, stop=term_over, batch=self._batch)
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


def _runner_event(msg: Msg) -> RunnerEvent | None:
    kind = msg.subject.rsplit(".", 1)[-1]
    if kind not in ("started", "completed", "failed", "cancelled"):
        return None
    try:
        raw = json.loads(msg.data)
        return RunnerEvent(kind=kind, job_id=str(raw["job_id"]), attempt=int(raw["attempt"]))  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        log.warning("undecodable event for the scheduler", extra={"subject": msg.subject})
        return None
