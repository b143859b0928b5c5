"""Ordered, retrying event publication: the trainer never waits on the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from visionyard.runner.service import CheckpointDeclared, Outgoing
from visionyard.shared.bus import Bus
from visionyard.shared.events import CheckpointStaged, JobEvent, LogEmitted

log = logging.getLogger("visionyard.runner.publisher")


class JetStreamEventPublisher:
    """One per attempt: a queue drained in order by one task that retries each item until its PubAck."""

    def __init__(self, bus: Bus, *, max_backoff: float = 5.0) -> None:
        self._bus = bus
        self._max_backoff = max_backoff
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    def emit(self, item: Outgoing) -> None:
        """Queue an item; returns at once."""
        self._queue.put_nowait(item)

    async def drain(self) -> None:
        """Wait until every queued item is acknowledged."""
        await self._queue.join()

    async def close(self) -> None:
        """Stop the publisher task (call after `drain`)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._deliver(item)
            finally:
                self._queue.task_done()

    async def _deliver(self, item: Outgoing) -> None:
        delay = 0.1
        event: JobEvent | None = item if isinstance(item, JobEvent) else None
        while True:
            try:
                if event is None:
                    assert isinstance(item, CheckpointDeclared)
                    event = await self._stage_checkpoint(item)
                await self._bus.publish(event)
                if isinstance(item, CheckpointDeclared):
                    item.path.unlink(missing_ok=True)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Order matters (seq), so retry this one until it lands instead of skipping ahead.
                log.warning(
                    "publish failed, retrying in %.1fs: %s", delay, error,
                    extra={"job_id": getattr(item, "job_id", None), "seq": getattr(item, "seq", None)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def _stage_checkpoint(self, item: CheckpointDeclared) -> JobEvent:
        # The file goes into the object store first, so the event never names a missing object.
        if not item.path.is_file():
            return LogEmitted(
                job_id=item.job_id, attempt=item.attempt, seq=item.seq, level="ERROR",
                event_type="checkpoint_missing",
                message=f"declared {item.kind} checkpoint {item.path} does not exist",
            )
        sha256, size = await self._bus.put_file(item.object_name, item.path)
        return CheckpointStaged(
            job_id=item.job_id,
            attempt=item.attempt,
            seq=item.seq,
            checkpoint_kind=item.kind,
            object_name=item.object_name,
            sha256=sha256,
            size_bytes=size,
            epoch=item.epoch,
        )
