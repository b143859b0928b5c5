"""Browser pages that reopen their WebSocket on every render: only the newest socket writes, and it resumes exactly.

The original frontend (useTrainingMonitor.ts) names neither `last_seq` nor `session_id`, and re-renders on every
socket open, close and message, each render closing its socket and opening a new one (some of the old ones it
never closes). Such a page is identified by (peer address, Origin, User-Agent, job): only its newest socket
carries the job's messages (`PageSockets`), and the socket it replaced writes nothing more at all, not even a
`pong` (each would re-render the page and cost it another socket).

Where the new socket starts is what the replaced one *wrote* (`PageWriter`), counted per message: before this it
was what the replaced socket's feed had *offered* to its send queue, so messages still queued when the page moved
on were counted as delivered and never reached the page (measured in headless Chromium: 1 to 3 of a small job's
16 live messages lost per run, among them queued→running, which left the page showing "queued" while it trained).
An event can carry two messages (progress and metrics); a socket replaced between them makes the next one start
at the second.

Tried and dropped (measured with `tools/original-frontend`): holding each message until the page replaced the
socket, and writing again a message the page closed the socket on within a few milliseconds. That page closes
sockets as fast whether it dispatched the message or not, so the second lost 10 of 16 messages and duplicated 4.
A browser drops what reaches a socket after the page called `close()` on it, and nothing the page sends tells
which messages those were: the one case this cannot cover is a message written in the instant the page closes
the socket. Clients that send `last_seq` or `session_id`, or no Origin (the CLI, scripts, the bench), are not
pages: they are never muted and resume from what they name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

# A page that comes back within this long (a reopened socket) resumes where its previous socket stopped.
SESSION_MEMORY_SECONDS = 120.0

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
    """What one page socket has written of the job, and whether the page has replaced it."""

    def __init__(self, *, start: Resume) -> None:
        self.delivered = start
        self.superseded = asyncio.Event()
        # Stops the socket's feed of the job once the page replaced it.
        self.mute: Callable[[], Awaitable[Any]] | None = None

    async def write(self, message: Any, write: Callable[[Any], Awaitable[None]]) -> bool:
        """Write `message` and count it; False once the page replaced this socket (it writes nothing more)."""
        if self.superseded.is_set():
            return False
        seq = seq_of(message)
        if seq is not None:
            seq_now, count = self.delivered
            self.delivered = (seq, count + 1) if seq == seq_now else (seq, 1)
        await write(message)
        return True

    def resume_point(self) -> Resume:
        """Stop writing; where the page's next socket starts."""
        self.superseded.set()
        return self.delivered


class PageSockets:
    """The newest socket of each browser page on each job; the older ones are muted."""

    def __init__(self) -> None:
        self._current: dict[PageKey, PageWriter] = {}
        self._left_at: dict[PageKey, tuple[float, Resume]] = {}
        self.takeovers = 0  # sockets that took over from a page's previous one (tests wait on it)

    def _forget_old(self, now: float) -> None:
        self._left_at = {key: value for key, value in self._left_at.items() if now - value[0] < SESSION_MEMORY_SECONDS}

    async def take_over(self, key: PageKey, writer: PageWriter) -> Resume | None:
        """Mute the page's previous socket on the job; where the new one starts (None: a page not seen lately)."""
        now = asyncio.get_running_loop().time()
        self._forget_old(now)
        previous = self._current.get(key)
        self._current[key] = writer
        start: Resume | None = None
        if previous is not None and previous is not writer:
            start = previous.resume_point()
            if previous.mute is not None:
                await previous.mute()
        left = self._left_at.pop(key, None)
        if start is None and left is not None:
            start = left[1]
        if start is not None:
            self.takeovers += 1
        return start

    def release(self, writer: PageWriter) -> None:
        """A socket is closing: where it stopped is where the page's next socket starts."""
        now = asyncio.get_running_loop().time()
        self._forget_old(now)
        for key, current in list(self._current.items()):
            if current is writer:
                del self._current[key]
                self._left_at[key] = (now, writer.resume_point())
