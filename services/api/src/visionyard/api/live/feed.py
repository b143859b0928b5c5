"""Live job feeds for WebSocket clients, read straight from the EVENTS stream.

Each subscription is an ordered JetStream consumer on `evt.job.<job_id>.>`, so the feed works the same
behind any number of API replicas (no in-process broadcast, no sticky sessions). A message's `seq` is
the event's EVENTS stream sequence: monotonic for the job across every producer (API, runner, storage,
tracker), which is what lets a client that reconnects with `last_seq` resume with no gap and no
duplicate. The feed replays the job's events from the start to rebuild the status it reports as
`old_status`, and sends only what lies after `last_seq`. A client in batched mode (`live.batch`)
gets the same messages grouped into JSON-array frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from visionyard.api.live.adapters import JobEventsSubscription, subscribe_job_events
from visionyard.api.live.batch import Batcher, Entry, Frame, encode_entry, frames_of
from visionyard.shared.bus import Bus
from visionyard.shared.events import (
    ArtifactStored,
    ExportStatusChanged,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobQueued,
    JobStarted,
    JobTracked,
    LogEmitted,
    ProgressReported,
    decode_job_event,
)
from visionyard.shared.tasks import cancel_all

if TYPE_CHECKING:
    from visionyard.api.live.hub import FeedHandle, FeedHub
    from visionyard.api.live.page import PageWriter
    from visionyard.api.scheduling.feed import QueuePositionsFeed

log = logging.getLogger("visionyard.api.live.feed")

WsMessage = dict[str, Any]

_STATUS_OF: dict[type[JobEvent], str] = {
    JobQueued: "queued",
    JobStarted: "running",
    JobCancelRequested: "cancelling",
    JobCompleted: "completed",
    JobFailed: "failed",
    JobCancelled: "cancelled",
}


@dataclass
class JobView:
    """What a feed knows of a job from the events it has read so far."""

    job_id: str
    status: str = "pending"
    attempt: int = 0
    total_epochs: int | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None


def _timestamp(moment: datetime) -> str:
    return moment.isoformat()


def wire_id(job_id: str) -> int | str:
    """A job id as REST and WebSocket clients see it: the integer (events carry its decimal string)."""
    return int(job_id) if job_id.isdigit() else job_id


# Messages that end an attempt.
TERMINAL_TYPES = frozenset({"training_complete", "training_error"})
# A status change or the end of an attempt is sent only once the job's row (what GET /training/jobs/{id}
# answers) shows that status: a client that refetches the job on it (the original frontend does) must not read
# the status before. Called with the job id, the attempt and the status; returns once the row shows it.
Gate = Callable[[str, int, str], Awaitable[None]]


def translate(event: JobEvent, *, seq: int, view: JobView) -> list[WsMessage]:
    """The WebSocket messages (API.md) one event produces, updating `view`; [] for stale attempts."""
    if event.attempt < view.attempt:
        return []  # fencing: a superseded attempt must not move the job shown to users
    view.attempt = event.attempt
    messages: list[WsMessage] = []
    # A queued attempt waits as `queued`, `retrying` or `resuming`; the event says which.
    new_status = event.status if isinstance(event, JobQueued) else _STATUS_OF.get(type(event))
    if new_status is not None and new_status != view.status:
        messages.append(
            {
                "type": "training_status_change",
                "job_id": wire_id(event.job_id),
                "old_status": view.status,
                "new_status": new_status,
                "attempt": event.attempt,
                "timestamp": _timestamp(event.occurred_at),
            }
        )
        view.status = new_status
    if isinstance(event, ProgressReported):
        view.total_epochs = event.total_epochs
        percent = round(100.0 * event.epoch / event.total_epochs, 2) if event.total_epochs else None
        messages.append(
            {
                "type": "training_progress",
                "job_id": wire_id(event.job_id),
                "attempt": event.attempt,
                "status": view.status,
                "current_epoch": event.epoch,
                "total_epochs": event.total_epochs,
                "progress_percent": percent,
                "metrics": event.metrics,
                "checkpoint_path": view.checkpoints.get("last"),
                "best_checkpoint_path": view.checkpoints.get("best"),
            }
        )
        messages.append(
            {"type": "training_metrics", "job_id": wire_id(event.job_id), "epoch": event.epoch, "step": event.step,
             "metrics": event.metrics}
        )
    elif isinstance(event, LogEmitted):
        messages.append(
            {
                "type": "training_log",
                "job_id": wire_id(event.job_id),
                "level": event.level,
                "event_type": event.event_type,
                "message": event.message,
                "timestamp": _timestamp(event.occurred_at),
            }
        )
    elif isinstance(event, ArtifactStored):
        view.checkpoints[event.checkpoint_kind] = event.uri
    elif isinstance(event, JobTracked):
        view.mlflow_run_id = event.run_id
    elif isinstance(event, ExportStatusChanged):
        messages.append(
            {
                "type": "export_status_change",
                "job_id": wire_id(event.job_id),
                "export_job_id": wire_id(event.export_job_id),
                "old_status": event.old_status,
                "new_status": event.new_status,
                "timestamp": _timestamp(event.occurred_at),
            }
        )
    elif isinstance(event, JobCompleted):
        messages.append(_terminal("training_complete", event, view, epochs=event.total_epochs_completed,
                                  final=event.final_metrics, best=event.best_metrics, best_epoch=event.best_epoch,
                                  error=None))
    elif isinstance(event, JobFailed):
        messages.append(_terminal("training_error", event, view, epochs=None, final={}, best={}, best_epoch=None,
                                  error=f"{event.reason.value}: {event.error_message}"))
    elif isinstance(event, JobCancelled):
        messages.append(_terminal("training_error", event, view, epochs=None, final={}, best={}, best_epoch=None,
                                  error="cancelled"))
    for message in messages:
        message["seq"] = seq
    return messages


def _terminal(
    kind: str,
    event: JobEvent,
    view: JobView,
    *,
    epochs: int | None,
    final: dict[str, float],
    best: dict[str, float],
    best_epoch: int | None,
    error: str | None,
) -> WsMessage:
    return {
        "type": kind,
        "job_id": wire_id(event.job_id),
        "attempt": event.attempt,
        "status": view.status,
        "total_epochs_completed": epochs,
        "final_metrics": final,
        "best_metrics": best,
        "best_epoch": best_epoch,
        "best_checkpoint_path": view.checkpoints.get("best"),
        "mlflow_run_id": view.mlflow_run_id,
        "error_message": error,
    }


Send = Callable[[WsMessage], Awaitable[None]]


class JobEventReader:
    """An ordered consumer over one job's events from the first one, each decoded and translated once.

    Subclasses decide where the translated messages of each event go (`on_messages`).
    """

    def __init__(self, *, bus: Bus, job_id: str, gate: Gate | None = None) -> None:
        self.job_id = job_id
        self._bus = bus
        self._view = JobView(job_id=job_id)
        self._subscription: JobEventsSubscription | None = None
        # Holds an attempt's terminal messages (and everything after them) until the job's row shows it.
        self._gate = gate

    async def start(self) -> None:
        """Open the ordered consumer over the job's events, from the first one."""
        self._subscription = await subscribe_job_events(self._bus, self.job_id, self.on_event)

    async def on_event(self, subject: str, data: bytes, seq: int) -> None:
        """Decode and translate one event of the job (`seq`: its EVENTS stream sequence) and pass it on."""
        try:
            event = decode_job_event(subject, data)
        except ValueError:
            log.warning("undecodable event on live feed", extra={"subject": subject, "seq": seq})
            return
        messages = translate(event, seq=seq, view=self._view)
        if self._gate is not None:
            shown = [message.get("new_status") or message.get("status") for message in messages
                     if message["type"] in TERMINAL_TYPES or message["type"] == "training_status_change"]
            if shown and shown[-1]:
                await self._gate(self.job_id, event.attempt, str(shown[-1]))
        await self.on_messages(seq, messages)

    async def on_messages(self, seq: int, messages: list[WsMessage]) -> None:
        """Handle the messages one event translated to (possibly none: it may only move the view)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Close the consumer."""
        if self._subscription is not None:
            await self._subscription.stop()
            self._subscription = None


class JobFeed(JobEventReader):
    """One client's subscription to one job: replay, then live, in stream order."""

    def __init__(self, *, bus: Bus, job_id: str, last_seq: int | None, send: Send, gate: Gate | None = None,
                 skip: int = 0) -> None:
        super().__init__(bus=bus, job_id=job_id, gate=gate)
        self._last_seq = last_seq or 0
        self._send = send
        self._skip = skip  # messages of the next event the client has already

    @property
    def position(self) -> int:
        """The seq of the last event passed to the client."""
        return self._last_seq

    async def on_messages(self, seq: int, messages: list[WsMessage]) -> None:
        """Send what lies after the client's `last_seq`."""
        if seq <= self._last_seq:
            return  # the client has it already; it only rebuilt the view
        self._last_seq = seq
        skip, self._skip = self._skip, 0
        for message in messages[skip:]:
            await self._send(message)


class BatchedJobFeed(JobEventReader):
    """One client's own subscription in batched mode: replay, then live, as frames of what lies after `last_seq`."""

    def __init__(self, *, bus: Bus, job_id: str, last_seq: int | None, batch_ms: int,
                 offer: Callable[[Frame], None], gate: Gate | None = None) -> None:
        super().__init__(bus=bus, job_id=job_id, gate=gate)
        self._last_seq = last_seq or 0
        self._offer = offer
        self._batcher = Batcher(batch_ms=batch_ms, deliver=self._deliver)

    @property
    def position(self) -> int:
        """The seq of the last event passed to the client."""
        return self._last_seq

    async def on_messages(self, seq: int, messages: list[WsMessage]) -> None:
        """Batch what lies after the client's `last_seq`."""
        if seq <= self._last_seq or not messages:
            return
        self._last_seq = seq
        self._batcher.add(encode_entry(seq, messages))

    def _deliver(self, entries: list[Entry]) -> None:
        for frame in frames_of(entries):
            self._offer(frame)

    async def stop(self) -> None:
        """Close the consumer and drop the pending batch (the client is leaving)."""
        self._batcher.close()
        await super().stop()


@dataclass
class LiveStats:
    """Counters for `/api/v1/ws/stats`."""

    connections: int = 0
    subscriptions: int = 0
    messages_sent: int = 0
    dropped_slow_clients: int = 0


class LiveConnection:
    """One WebSocket client: its feeds and a bounded send queue drained by one writer task.

    A client that cannot keep up is disconnected (it reconnects with `last_seq`) rather than being
    allowed to grow the API's memory without bound.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        write: Send,
        stats: LiveStats,
        max_queue: int = 10_000,
        hub: FeedHub | None = None,
        write_text: Callable[[str], Awaitable[None]] | None = None,
        gate: Gate | None = None,
        positions: QueuePositionsFeed | None = None,
    ) -> None:
        self._bus = bus
        # A waiting job's place in the queue comes beside its events (`queue_position`, scheduling/feed.py).
        self._positions = positions
        self._offer_position: Callable[[WsMessage], None] = self.offer
        self._gate = gate
        self._write = write
        # Shared feeds hand over messages already encoded once for every client (see `live.hub`).
        self._write_text = write_text or (lambda text: write(json.loads(text)))
        self._hub = hub
        self._stats = stats
        self._queue: asyncio.Queue[WsMessage | str | Frame | None] = asyncio.Queue(maxsize=max_queue)
        self._feeds: dict[str, JobEventReader | FeedHandle] = {}
        # A browser page's socket counts what it writes (`live.page`): set before the first subscription.
        self.page: PageWriter | None = None
        self._writer = asyncio.create_task(self._drain())
        self.overflowed = asyncio.Event()
        stats.connections += 1

    async def enqueue(self, message: WsMessage) -> None:
        """Queue a message for this client; overflow marks the client as too slow."""
        self.offer(message)

    def offer(self, message: WsMessage | str | Frame) -> None:
        """Queue a message (its JSON text, or a batched frame) without waiting; overflow marks the client as too slow."""
        if self.overflowed.is_set():
            return  # being disconnected; it resumes from its last_seq
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._stats.dropped_slow_clients += 1
            self.overflowed.set()

    async def _drain(self) -> None:
        while True:
            message = await self._queue.get()
            if message is None:
                return
            if self.page is not None:
                await self.page.write(message, self._write_one)  # nothing while another socket carries the page
                continue
            await self._write_one(message)

    async def _write_one(self, message: WsMessage | str | Frame) -> None:
        if isinstance(message, Frame):
            await self._write_text(message.text)
            self._stats.messages_sent += message.messages
            return
        if isinstance(message, str):
            await self._write_text(message)
        else:
            await self._write(message)
        self._stats.messages_sent += 1

    async def subscribe(self, job_id: str, *, last_seq: int | None, batch_ms: int | None = None,
                        skip: int = 0) -> None:
        """Start (or restart) the feed of one job: one message per frame, or batched every `batch_ms`.

        `skip`: the client has the first `skip` messages of the event after `last_seq` already (a page socket
        that replaced one which stopped inside an event, see `live.page`).
        """
        await self.unsubscribe(job_id)
        if self._positions is not None:
            self._positions.follow(job_id, self._offer_position)
        if self._hub is not None:
            handle = await self._hub.attach(job_id, last_seq=last_seq, offer=self.offer, batch_ms=batch_ms,
                                            skip=skip)
            if handle is not None:
                self._feeds[job_id] = handle
                self._stats.subscriptions += 1
                return
        # No hub, or the client resumes from further back than the shared feed holds: its own replay.
        feed: JobEventReader
        if batch_ms is None:
            feed = JobFeed(bus=self._bus, job_id=job_id, last_seq=last_seq, send=self.enqueue, gate=self._gate,
                           skip=skip)
        else:
            feed = BatchedJobFeed(bus=self._bus, job_id=job_id, last_seq=last_seq, batch_ms=batch_ms,
                                  offer=self.offer, gate=self._gate)
        self._feeds[job_id] = feed
        self._stats.subscriptions += 1
        await feed.start()

    async def unsubscribe(self, job_id: str) -> bool:
        """Stop the feed of one job; whether there was one."""
        if self._positions is not None:
            self._positions.unfollow(job_id, self._offer_position)
        feed = self._feeds.pop(job_id, None)
        if feed is None:
            return False
        self._stats.subscriptions -= 1
        await feed.stop()
        return True

    def positions(self) -> dict[str, int]:
        """For each watched job, the seq of the last event passed to this client (to resume a session)."""
        return {job_id: feed.position for job_id, feed in self._feeds.items() if hasattr(feed, "position")}

    async def close(self) -> None:
        """Stop every feed and the writer."""
        for job_id in list(self._feeds):
            await self.unsubscribe(job_id)
        await cancel_all([self._writer])
        self._stats.connections -= 1
