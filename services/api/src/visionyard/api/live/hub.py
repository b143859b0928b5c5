"""One live feed per job per API instance, fanned out to every WebSocket client watching the job.

Profiling the live path showed each client paying for its own ordered consumer, its own decode and
translation of every event and its own JSON encoding. Here one ordered consumer per job decodes and
translates each event once (`feed.translate`, so the messages are exactly those of `feed.JobFeed`),
encodes it once, and offers the text to each attached client. The feed keeps the job's recent
messages so a client that joins late, or reconnects with `last_seq`, first gets what it missed from
memory and then the live stream: gap-free and duplicate-free because attaching (copying the history
and registering) happens without yielding to the event loop, and each client skips what it has.
A client whose `last_seq` lies before what the feed still holds gets its own `JobFeed` replay instead.
The feed stops when its last client leaves, so memory follows the jobs being watched.

Clients in batched mode (`live.batch`) are grouped by their `batch_ms`: each group batches the feed's
entries and encodes each flush once, so every client of the group gets the same frame. A batched client
that joins gets what it lacks from the history as frames, then the group's flushes; a flush that overlaps
what it already has (it joined while the flush was pending) is cut down for it alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from visionyard.api.live.batch import (
    Batcher,
    Entry,
    Frame,
    encode_entry,
    frame_after,
    frames_of,
)
from visionyard.api.live.feed import Gate, JobEventReader, WsMessage
from visionyard.shared.bus import Bus

log = logging.getLogger("visionyard.api.live.hub")

# Messages a feed keeps for late joiners (about 0.3 KB each): older ones are replayed from the stream.
DEFAULT_RETAIN = 20_000
# How long a feed stays open after its last client left.
DEFAULT_LINGER_SECONDS = 30.0

Offer = Callable[[str | Frame], None]


class Listener:
    """One client's place in a shared feed: what it has been sent up to, how, and where texts go."""

    def __init__(self, *, last_seq: int | None, offer: Offer, batch_ms: int | None = None, skip: int = 0) -> None:
        self.last_seq = last_seq or 0
        self.batch_ms = batch_ms
        self._offer = offer
        self._skip = skip  # messages of the next event the client has already

    def take(self, entry: Entry) -> None:
        """Pass on the entry's messages unless the client has them already."""
        seq, texts = entry
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        skip, self._skip = self._skip, 0
        for text in texts[skip:]:
            self._offer(text)

    def take_frame(self, frame: Frame) -> None:
        """Pass on the frame, or the part of it the client does not have yet."""
        fresh = frame_after(frame, self.last_seq)
        if fresh is None:
            return
        self.last_seq = fresh.last_seq
        self._offer(fresh)


class BatchGroup:
    """The batched clients of one feed that share a `batch_ms`: one batch, one encoding per flush."""

    def __init__(self, batch_ms: int) -> None:
        self.listeners: set[Listener] = set()
        self.batcher = Batcher(batch_ms=batch_ms, deliver=self._deliver)

    def _deliver(self, entries: list[Entry]) -> None:
        for frame in frames_of(entries):
            for listener in list(self.listeners):
                listener.take_frame(frame)


class SharedJobFeed(JobEventReader):
    """The ordered consumer of one job's events, its view, recent messages and listeners."""

    def __init__(self, *, bus: Bus, job_id: str, retain: int, gate: Gate | None = None) -> None:
        super().__init__(bus=bus, job_id=job_id, gate=gate)
        self._retain = retain
        self._history: deque[Entry] = deque()
        self._held = 0
        # The highest seq dropped from the history: a listener behind it cannot be served from memory.
        self._dropped_upto = 0
        self.listeners: set[Listener] = set()
        self._per_message: set[Listener] = set()
        self._groups: dict[int, BatchGroup] = {}

    async def on_messages(self, seq: int, messages: list[WsMessage]) -> None:
        """Encode the event's messages once, keep them, and offer them to every listener."""
        if not messages:
            return
        entry = encode_entry(seq, messages)
        self._history.append(entry)
        self._held += len(entry[1])
        while self._held > self._retain and len(self._history) > 1:
            dropped_seq, dropped = self._history.popleft()
            self._held -= len(dropped)
            self._dropped_upto = dropped_seq
        for listener in list(self._per_message):
            listener.take(entry)
        for group in self._groups.values():
            group.batcher.add(entry)

    def can_serve(self, last_seq: int | None) -> bool:
        """Whether everything after `last_seq` is still in memory (or yet to come)."""
        return (last_seq or 0) >= self._dropped_upto

    def attach(self, listener: Listener) -> None:
        """Give the listener the history it lacks, then the live messages (no await in between)."""
        self.listeners.add(listener)
        if listener.batch_ms is None:
            for entry in self._history:
                listener.take(entry)
            self._per_message.add(listener)
            return
        # The history includes what the group holds for its next flush; `take_frame` skips it then.
        for frame in frames_of(entry for entry in self._history if entry[0] > listener.last_seq):
            listener.take_frame(frame)
        group = self._groups.get(listener.batch_ms)
        if group is None:
            group = self._groups[listener.batch_ms] = BatchGroup(listener.batch_ms)
        group.listeners.add(listener)

    def detach(self, listener: Listener) -> None:
        """Stop offering messages to the listener (a group left empty is closed)."""
        self.listeners.discard(listener)
        self._per_message.discard(listener)
        if listener.batch_ms is None:
            return
        group = self._groups.get(listener.batch_ms)
        if group is not None:
            group.listeners.discard(listener)
            if not group.listeners:
                group.batcher.close()
                del self._groups[listener.batch_ms]

    async def stop(self) -> None:
        """Close the consumer and drop every pending batch."""
        for group in self._groups.values():
            group.batcher.close()
        self._groups.clear()
        await super().stop()


class FeedHandle:
    """What a client holds while it watches a job through a shared feed."""

    def __init__(self, hub: FeedHub, feed: SharedJobFeed, listener: Listener) -> None:
        self._hub = hub
        self._feed = feed
        self._listener = listener

    @property
    def position(self) -> int:
        """The seq of the last event passed to the client."""
        return self._listener.last_seq

    async def stop(self) -> None:
        """Leave the feed (stopping it if this was its last client)."""
        await self._hub.detach(self._feed, self._listener)


class FeedHub:
    """The shared feeds of one API instance, by job id."""

    def __init__(self, *, bus: Bus, retain: int = DEFAULT_RETAIN, gate: Gate | None = None,
                 linger_seconds: float = DEFAULT_LINGER_SECONDS) -> None:
        self._bus = bus
        self._retain = retain
        self._gate = gate
        self._linger = linger_seconds
        self._feeds: dict[str, SharedJobFeed] = {}
        self._stopping: dict[str, asyncio.TimerHandle] = {}

    async def attach(self, job_id: str, *, last_seq: int | None, offer: Offer,
                     batch_ms: int | None = None, skip: int = 0) -> FeedHandle | None:
        """Watch `job_id` from after `last_seq` (batched if `batch_ms`); None when the feed no longer holds that far back."""
        pending_stop = self._stopping.pop(job_id, None)
        if pending_stop is not None:
            pending_stop.cancel()
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = SharedJobFeed(bus=self._bus, job_id=job_id, retain=self._retain, gate=self._gate)
            self._feeds[job_id] = feed
            try:
                await feed.start()
            except Exception:
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]
                raise
        if not feed.can_serve(last_seq):
            return None
        listener = Listener(last_seq=last_seq, offer=offer, batch_ms=batch_ms, skip=skip)
        feed.attach(listener)
        return FeedHandle(self, feed, listener)

    async def detach(self, feed: SharedJobFeed, listener: Listener) -> None:
        """Remove a listener; the last one out stops the feed."""
        feed.detach(listener)
        if feed.listeners:
            return
        if self._linger > 0 and self._feeds.get(feed.job_id) is feed:
            # A client that reconnects at once (the original frontend does on every render) finds the feed
            # still open instead of making it replay the job's history again.
            loop = asyncio.get_running_loop()
            self._stopping[feed.job_id] = loop.call_later(
                self._linger, lambda: asyncio.ensure_future(self._stop_idle(feed))
            )
            return
        await self._stop_idle(feed)

    async def _stop_idle(self, feed: SharedJobFeed) -> None:
        if feed.listeners:
            return
        self._stopping.pop(feed.job_id, None)
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        await feed.stop()

    async def close(self) -> None:
        """Stop every feed (at shutdown)."""
        for handle in self._stopping.values():
            handle.cancel()
        self._stopping.clear()
        for feed in list(self._feeds.values()):
            await feed.stop()
        self._feeds.clear()

    @property
    def feeds(self) -> int:
        """How many jobs have a shared feed open."""
        return len(self._feeds)
