"""Browser pages that reopen their WebSocket on every render: one socket of the page carries the job, exactly once.

The original frontend (useTrainingMonitor.ts) names neither `last_seq` nor `session_id`. It re-renders on every
socket open, close and message, and each render closes its current socket and opens a new one, so most of its
sockets live a few milliseconds; the ones its reconnect timer opens it never closes ("leaked"), and they go on
dispatching to the page's handlers. A browser drops whatever reaches a socket after the page called `close()` on
it, and nothing the page sends says which messages those were.

So a page, identified by (peer address, Origin, User-Agent, job), has one *carrier* among its open sockets, the
only one that writes anything (`PageSockets`); the others write nothing at all, not even `connected` or `pong`
(each would re-render the page and cost it another socket). The carrier is the page's oldest socket that has
stayed open for `STABLE_SECONDS` (a socket the page left open that long is one it leaked, or one it keeps); until
one has, the newest socket carries. When the carrier closes or is replaced, the next one resumes from what the
carrier *wrote*, counted per message (`PageWriter`): an event can carry two messages (progress and metrics), and
a socket replaced between them leaves the second to the next.

Measured with that frontend in headless Chromium (`tools/original-frontend`): before this, the newest socket
carried and resumed from what the previous one's feed had *queued*: 1 to 3 of a small job's 16 live messages
never reached the page (queued→running among them: the page showed "queued" while the job trained). Tried and
dropped: holding each message until the page replaced the socket, and writing a message again when the page closed
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
        self._left_at: dict[PageKey, tuple[float, Resume]] = {}
        # Sockets that joined a page, and carriers that handed the job to another socket (tests wait on them).
        self.joins = 0
        self.handovers = 0

    def _stable(self, writer: PageWriter, now: float) -> bool:
        return now - writer.opened_at >= STABLE_SECONDS

    async def join(self, key: PageKey, writer: PageWriter) -> None:
        """A page's socket opened: it carries the job unless one of the page's steady sockets does."""
        now = asyncio.get_running_loop().time()
        self._left_at = {k: v for k, v in self._left_at.items() if now - v[0] < SESSION_MEMORY_SECONDS}
        sockets = self._open.setdefault(key, [])
        steady = [socket for socket in sockets if self._stable(socket, now)]
        sockets.append(writer)
        self.joins += 1
        carrier = self._carrier.get(key)
        if carrier is not None and carrier in steady:
            return  # a socket the page keeps carries on; this one stays silent
        await self._move(key, carrier, steady[0] if steady else writer)

    async def leave(self, key: PageKey, writer: PageWriter) -> None:
        """A page's socket closed: if it carried the job, the page's steadiest open socket goes on from it."""
        now = asyncio.get_running_loop().time()
        sockets = self._open.get(key, [])
        if writer in sockets:
            sockets.remove(writer)
        if self._carrier.get(key) is not writer:
            return
        steady = [socket for socket in sockets if self._stable(socket, now)]
        successor = steady[0] if steady else (sockets[-1] if sockets else None)
        if successor is None:
            del self._carrier[key]
            self._open.pop(key, None)
            self._left_at[key] = (now, await writer.hand_over())  # the page's next socket resumes here
            return
        await self._move(key, writer, successor)

    async def _move(self, key: PageKey, carrier: PageWriter | None, successor: PageWriter) -> None:
        if carrier is successor:
            return
        start: Resume | None = None
        if carrier is not None:
            start = await carrier.hand_over()
        else:
            left = self._left_at.pop(key, None)
            start = left[1] if left is not None else None
        if start is not None:
            self.handovers += 1
        self._carrier[key] = successor
        successor.carrying = True
        if successor.carry is not None:
            await successor.carry(start)
