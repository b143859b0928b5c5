"""One live feed per job per API instance, fanned out to every WebSocket client watching the job.

Profiling the live path showed each client paying for its own ordered consumer, its own decode and
translation of every event and its own JSON encoding. Here one ordered consumer per job decodes and
translates each event once (`live.translate`, so the messages are exactly those of `live.JobFeed`),
encodes it once, and offers the text to each attached client. The feed keeps the job's recent
messages so a client that joins late, or reconnects with `last_seq`, first gets what it missed from
memory and then the live stream: gap-free and duplicate-free because attaching (copying the history
and registering) happens without yielding to the event loop, and each client skips what it has.
A client whose `last_seq` lies before what the feed still holds gets its own `JobFeed` replay instead.
The feed stops when its last client leaves, so memory follows the jobs being watched.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable


from visionyard.shared.bus import Bus

from visionyard.api.live import JobEventReader, WsMessage

log = logging.getLogger("visionyard.api.livehub")

# Messages a feed keeps for late joiners (about 0.3 KB each): older ones are replayed from the stream.
DEFAULT_RETAIN = 20_000

Entry = tuple[int, list[str]]


class Listener:
    """One client's place in a shared feed: what it has been sent up to, and where texts go."""

    def __init__(self, *, last_seq: int | None, offer: Callable[[str], None]) -> None:
        self.last_seq = last_seq or 0
        self._offer = offer

    def take(self, entry: Entry) -> None:
        """Pass on the entry's messages unless the client has them already."""
        seq, texts = entry
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        for text in texts:
            self._offer(text)


class SharedJobFeed(JobEventReader):
    """The ordered consumer of one job's events, its view, recent messages and listeners."""

    def __init__(self, *, bus: Bus, job_id: str, retain: int) -> None:
        super().__init__(bus=bus, job_id=job_id)
        self._retain = retain
        self._history: deque[Entry] = deque()
        self._held = 0
        # The highest seq dropped from the history: a listener behind it cannot be served from memory.
        self._dropped_upto = 0
        self.listeners: set[Listener] = set()

    async def on_messages(self, seq: int, messages: list[WsMessage]) -> None:
        """Encode the event's messages once, keep them, and offer them to every listener."""
        if not messages:
            return
        # Same encoding as Starlette's `send_json`, done once for every client.
        entry = (seq, [json.dumps(message, separators=(",", ":"), ensure_ascii=False) for message in messages])
        self._history.append(entry)
        self._held += len(entry[1])
        while self._held > self._retain and len(self._history) > 1:
            dropped_seq, dropped = self._history.popleft()
            self._held -= len(dropped)
            self._dropped_upto = dropped_seq
        for listener in list(self.listeners):
            listener.take(entry)

    def can_serve(self, last_seq: int | None) -> bool:
        """Whether everything after `last_seq` is still in memory (or yet to come)."""
        return (last_seq or 0) >= self._dropped_upto

    def attach(self, listener: Listener) -> None:
        """Give the listener the history it lacks, then the live messages (no await in between)."""
        for entry in self._history:
            listener.take(entry)
        self.listeners.add(listener)

class FeedHandle:
    """What a client holds while it watches a job through a shared feed."""

    def __init__(self, hub: FeedHub, feed: SharedJobFeed, listener: Listener) -> None:
        self._hub = hub
        self._feed = feed
        self._listener = listener

    async def stop(self) -> None:
        """Leave the feed (stopping it if this was its last client)."""
        await self._hub.detach(self._feed, self._listener)


class FeedHub:
    """The shared feeds of one API instance, by job id."""

    def __init__(self, *, bus: Bus, retain: int = DEFAULT_RETAIN) -> None:
        self._bus = bus
        self._retain = retain
        self._feeds: dict[str, SharedJobFeed] = {}

    async def attach(self, job_id: str, *, last_seq: int | None, offer: Callable[[str], None]) -> FeedHandle | None:
        """Watch `job_id` from after `last_seq`; None when the feed no longer holds that far back."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = SharedJobFeed(bus=self._bus, job_id=job_id, retain=self._retain)
            self._feeds[job_id] = feed
            try:
                await feed.start()
            except Exception:
                if self._feeds.get(job_id) is feed:
                    del self._feeds[job_id]
                raise
        if not feed.can_serve(last_seq):
            return None
        listener = Listener(last_seq=last_seq, offer=offer)
        feed.attach(listener)
        return FeedHandle(self, feed, listener)

    async def detach(self, feed: SharedJobFeed, listener: Listener) -> None:
        """Remove a listener; the last one out stops the feed."""
        feed.listeners.discard(listener)
        if feed.listeners:
            return
        if self._feeds.get(feed.job_id) is feed:
            del self._feeds[feed.job_id]
        await feed.stop()

    @property
    def feeds(self) -> int:
        """How many jobs have a shared feed open."""
        return len(self._feeds)
