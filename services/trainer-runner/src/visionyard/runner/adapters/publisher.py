"""Ordered, retrying event publication: the trainer never waits on the broker."""

from __future__ import annotations

import asyncio
import logging

from visionyard.runner.ports import CheckpointDeclared, Outgoing
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import CheckpointStaged, JobEvent, LogEmitted
from visionyard.shared.requests import CheckpointIncoming
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.runner.publisher")

# Below this size a checkpoint is copied after it is staged; from it up the runner announces it first
# (`CheckpointIncoming`), so storage's copy overlaps the put instead of following it.
INCOMING_CHECKPOINT_MIN_BYTES = 32 * 1024 * 1024


class JetStreamEventPublisher:
    """One per attempt: a queue drained in order by one task that retries each item until its PubAck.

    Events waiting together are published as one window (`Bus.publish_ordered`): the profile of a
    fast trainer showed the runner idle on one PubAck round trip per event.
    """

    def __init__(self, bus: Bus, *, max_backoff: float = 5.0, window: int = 256) -> None:
        self._bus = bus
        self._max_backoff = max_backoff
        self._window = window
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
        await cancel_all([self._task])

    async def _run(self) -> None:
        carried: Outgoing | None = None
        while True:
            item = carried if carried is not None else await self._queue.get()
            carried = None
            if not isinstance(item, JobEvent):
                try:
                    await self._deliver(item)
                finally:
                    self._queue.task_done()
                continue
            window = [item]
            while len(window) < self._window and not self._queue.empty():
                following = self._queue.get_nowait()
                if not isinstance(following, JobEvent):
                    carried = following  # a checkpoint is staged after the events before it land
                    break
                window.append(following)
            try:
                await self._deliver_window(window)
            finally:
                for _ in window:
                    self._queue.task_done()

    async def _deliver_window(self, window: list[JobEvent]) -> None:
        delay = 0.1
        while True:
            try:
                acked = await self._bus.publish_ordered(window)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("publish failed: %s", error)
                acked = 0
            window = window[acked:]
            if not window:
                return
            # Order matters (seq): retry from the first unacknowledged event instead of skipping ahead.
            log.warning(
                "publish incomplete, retrying %d events in %.1fs", len(window), delay,
                extra={"job_id": window[0].job_id, "seq": window[0].seq},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff)

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
        object_id = self._bus.new_object_id()
        size = item.path.stat().st_size
        if size >= INCOMING_CHECKPOINT_MIN_BYTES:
            await self._announce(item, object_id=object_id, size=size)
        sha256, size = await self._bus.put_file(item.object_name, item.path, object_id=object_id)
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

    async def _announce(self, item: CheckpointDeclared, *, object_id: str, size: int) -> None:
        # Storage can copy a large checkpoint into S3 while it is put here instead of after: the
        # `checkpoint` event that follows still decides. A lost hint costs that overlap, nothing else.
        hint = CheckpointIncoming(
            job_id=item.job_id, attempt=item.attempt, seq=item.seq, checkpoint_kind=item.kind,
            object_name=item.object_name, object_id=object_id, size_bytes=size,
        )
        try:
            await self._bus.notify(subjects.STORAGE_CHECKPOINT_INCOMING, hint)
        except Exception as error:
            log.info("could not announce checkpoint %s: %s", item.object_name, error)
