"""Browser pages that reopen their WebSocket on every render: one socket of the page carries the job, exactly once.

The original frontend (useTrainingMonitor.ts) names neither `last_seq` nor `session_id`. It re-renders on every
socket open, close and message, and each render closes its current socket and opens a new one, so most of its
sockets live a few milliseconds; the ones its reconnect timer opens it never closes ("leaked"), and they go on
dispatching to the page's handlers. A browser drops whatever reaches a socket after the page called `close()` on
it, and nothing the page sends says which messages those were.

So a page, identified by (peer address, Origin, User-Agent, job), has at most one *carrier* among its open
sockets, the only one that writes anything (`PageSockets`); the others write nothing at all, not even `connected`
or `pong` (each would re-render the page and cost it another socket). The carrier is the page's oldest socket
that has stayed open for `STABLE_SECONDS`: a socket the page left open that long is one it keeps, or one it
leaked, and either dispatches what reaches it. Until one has, the job's messages wait (they are in the feed's
history); a page none of whose sockets ever stays open gets them on its newest socket after `FALLBACK_SECONDS`.
When the carrier closes, the next one resumes from what it *wrote*, counted per message (`PageWriter`): an event
can carry two messages (progress and metrics), and a carrier that stopped between them leaves the second.

Measured with that frontend in headless Chromium (`tools/original-frontend`): before this, the newest socket
carried and resumed from what the previous one's feed had *queued*: 1 to 3 of a small job's 16 live messages
never reached the page (queued→running among them: the page showed "queued" while the job trained). Counting
what was written instead still lost the first status change in most runs (written to a socket the page was
already closing, before any socket of it had stayed open). Tried and dropped: holding each message until the page replaced the socket, and writing a message again when the page closed
the socket within a few milliseconds of it: that page closes sockets as fast whether it dispatched the message or
not (10 of 16 lost, 4 duplicated). Clients that send `last_seq` or `session_id`, or no Origin (the CLI, scripts,
the bench), are not pages: they are never muted and resume from what they name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

# A page that comes back within this long (a reopened socket) resumes where its previous socket stopped.
SESSION_MEMORY_SECONDS = 120.0
# A page's socket open this long is one the page keeps (or leaked): it carries the job from then on.
STABLE_SECONDS = 0.5
# A page none of whose sockets stays open that long gets the job on its newest socket after this long.
FALLBACK_SECONDS = 5.0

PageKey = tuple[str, str, str, str]
# Where a page's socket starts: every event before `seq` delivered, and the first `count` messages of `seq`.
Resume = tuple[int, int]


def seq_of(message: Any) -> int | None:
    """The event seq a message (dict or its JSON text) carries, None for control messages."""
    if isinstance(message, str):
        if '"seq"' not in message:
            return None
        message = json.loads(message)
    seq = message.get("seq") if isinstance(message, dict) else None
    return seq if isinstance(seq, int) else None


class PageWriter:
    """One socket of a page: whether it carries the job now, and what it has written of it."""

    def __init__(self) -> None:
        self.opened_at = asyncio.get_running_loop().time()
        self.carrying = False
        self.delivered: Resume = (0, 0)
        # Set by the endpoint: start the job's feed from a resume point (this socket carries it), and stop it.
        self.carry: Callable[[Resume | None], Awaitable[None]] | None = None
        self.mute: Callable[[], Awaitable[Any]] | None = None

    async def write(self, message: Any, write: Callable[[Any], Awaitable[None]]) -> None:
        """Write `message` if this socket carries the job (counting it), else drop it."""
        if not self.carrying:
            return
        seq = seq_of(message)
        if seq is not None:
            seq_now, count = self.delivered
            self.delivered = (seq, count + 1) if seq == seq_now else (seq, 1)
        await write(message)

    async def hand_over(self) -> Resume:
        """Stop carrying; where the next carrier starts."""
        self.carrying = False
        if self.mute is not None:
            await self.mute()
        return self.delivered


class PageSockets:
    """The open sockets of each browser page on each job, and which of them carries the job."""

    def __init__(self) -> None:
        self._open: dict[PageKey, list[PageWriter]] = {}
        self._carrier: dict[PageKey, PageWriter] = {}
        # Where a page with no carrier resumes, and since when it has had none (forgotten after a while).
        self._resume: dict[PageKey, tuple[float, Resume]] = {}
        self._first_seen: dict[PageKey, float] = {}
        self._lock = asyncio.Lock()
        # Sockets that joined a page, and sockets that began to carry one (tests wait on them).
        self.joins = 0
        self.elected = 0

    def _stable(self, writer: PageWriter, now: float) -> bool:
        return now - writer.opened_at >= STABLE_SECONDS

    async def join(self, key: PageKey, writer: PageWriter, *, live_from: int) -> None:
        """A page's socket opened (`live_from`: the stream's last seq now, where a page not seen lately starts)."""
        now = asyncio.get_running_loop().time()
        async with self._lock:
            self._resume = {k: v for k, v in self._resume.items() if now - v[0] < SESSION_MEMORY_SECONDS}
            if key not in self._open and key not in self._resume:
                self._first_seen[key] = now
                self._resume[key] = (now, (live_from + 1, 0))
            self._open.setdefault(key, []).append(writer)
            self.joins += 1
            await self._elect(key)
        # Once this socket has stayed open long enough it may carry the job: look again then.
        asyncio.get_running_loop().call_later(STABLE_SECONDS, lambda: asyncio.ensure_future(self._look_again(key)))

    async def leave(self, key: PageKey, writer: PageWriter) -> None:
        """A page's socket closed: if it carried the job, another of the page's sockets goes on from it."""
        async with self._lock:
            sockets = self._open.get(key, [])
            if writer in sockets:
                sockets.remove(writer)
            if self._carrier.get(key) is writer:
                del self._carrier[key]
                self._resume[key] = (asyncio.get_running_loop().time(), await writer.hand_over())
            if not sockets:
                self._open.pop(key, None)
                self._first_seen.pop(key, None)
                return
            await self._elect(key)

    async def _look_again(self, key: PageKey) -> None:
        async with self._lock:
            if key in self._open:
                await self._elect(key)

    async def _elect(self, key: PageKey) -> None:
        """Give the job to the page's oldest socket that stayed open; failing that, after `FALLBACK_SECONDS` of a
        page whose every socket closes at once, to its newest."""
        now = asyncio.get_running_loop().time()
        sockets = self._open.get(key, [])
        carrier = self._carrier.get(key)
        steady = [socket for socket in sockets if self._stable(socket, now)]
        if carrier is not None and carrier in steady:
            return
        if steady:
            successor = steady[0]
        elif sockets and now - self._first_seen.get(key, now) >= FALLBACK_SECONDS:
            successor = sockets[-1]
        else:
            return  # no socket of the page has stayed open yet: the job's messages wait for one that does
        if successor is carrier:
            return
        start: Resume | None
        if carrier is not None:
            start = await carrier.hand_over()
        else:
            resume = self._resume.pop(key, None)
            start = resume[1] if resume is not None else None
        self.elected += 1
        self._carrier[key] = successor
        successor.carrying = True
        if successor.carry is not None:
            await successor.carry(start)
