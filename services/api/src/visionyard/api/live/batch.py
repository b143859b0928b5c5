"""Batched live delivery: a job's messages grouped into one WebSocket frame, a JSON array, per flush.

A client that follows a fast job asks for it with `batch_ms` (API.md, WebSocket). Per-message frames
cost one `send` per message per client, which no Python process sustains at hundreds of thousands of
messages/s; a frame per flush costs one `send` per flush per client. The messages inside a frame are
exactly the usual ones (each with its `type` and `seq`), in stream order, none left out and none twice.

Flushing is leading-edge: a message that finds the batch idle for at least `batch_ms` goes out at once
(on the next turn of the event loop, so a burst already in hand still shares one frame); after a flush,
what arrives in the next `batch_ms` goes out together when that interval ends. A quiet job's message is
therefore never held back, and a busy job's client gets at most one frame per `batch_ms` (more only when
a frame reaches `MAX_FRAME_MESSAGES` or `MAX_FRAME_CHARS`, which bound the size a client must accept).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

MIN_BATCH_MS = 1
MAX_BATCH_MS = 1000
# A frame's bounds: a replay or a burst is split rather than sent as one frame a client may refuse
# (the `websockets` client's default `max_size` is 1 MiB).
MAX_FRAME_MESSAGES = 1000
MAX_FRAME_CHARS = 256 * 1024

# One event's messages, encoded: (its seq, the JSON text of each message).
Entry = tuple[int, list[str]]


def parse_batch_ms(value: Any) -> int:
    """The batch interval a client asked for, clamped to 1–1000 ms; ValueError naming the field otherwise."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdecimal():
        number = int(value)
    if number is None or number < 0:
        raise ValueError(f"batch_ms must be a non-negative integer number of milliseconds, got {value!r}")
    return min(max(number, MIN_BATCH_MS), MAX_BATCH_MS)


def encode_entry(seq: int, messages: Iterable[dict[str, Any]]) -> Entry:
    """An event's messages as compact JSON texts, done once for every client.

    pydantic-core's encoder, not the stdlib's: ~1 µs instead of ~6 µs per progress message (two
    messages per event, measured), the same JSON (compact, UTF-8 unescaped, NaN/Infinity written as
    the stdlib writes them); only float spelling may differ (1e-05 vs 0.00001), not the value.
    """
    return seq, [to_json(message).decode() for message in messages]


@dataclass(frozen=True)
class Frame:
    """One batched WebSocket frame: the entries it carries and their JSON array, encoded once."""

    entries: tuple[Entry, ...]
    text: str
    messages: int

    @property
    def first_seq(self) -> int:
        """The seq of the frame's first event."""
        return self.entries[0][0]

    @property
    def last_seq(self) -> int:
        """The seq of the frame's last event."""
        return self.entries[-1][0]


def _frame(entries: Sequence[Entry]) -> Frame:
    texts = [text for _, event_texts in entries for text in event_texts]
    return Frame(entries=tuple(entries), text="[" + ",".join(texts) + "]", messages=len(texts))


def frames_of(entries: Iterable[Entry]) -> Iterator[Frame]:
    """The entries as frames in order, each within the frame bounds (an event is never split)."""
    chunk: list[Entry] = []
    messages = chars = 0
    for entry in entries:
        size = sum(len(text) + 1 for text in entry[1])
        if chunk and (messages + len(entry[1]) > MAX_FRAME_MESSAGES or chars + size > MAX_FRAME_CHARS):
            yield _frame(chunk)
            chunk, messages, chars = [], 0, 0
        chunk.append(entry)
        messages += len(entry[1])
        chars += size
    if chunk:
        yield _frame(chunk)


def frame_after(frame: Frame, last_seq: int) -> Frame | None:
    """What of `frame` a client that has everything up to `last_seq` still needs (the frame itself if all)."""
    if frame.first_seq > last_seq:
        return frame
    if frame.last_seq <= last_seq:
        return None
    return _frame([entry for entry in frame.entries if entry[0] > last_seq])


class Batcher:
    """Collects entries and hands them on at most once per interval (leading edge, see module doc)."""

    def __init__(self, *, batch_ms: int, deliver: Callable[[list[Entry]], None]) -> None:
        self.batch_ms = batch_ms
        self._interval = batch_ms / 1000
        self._deliver = deliver
        self._pending: list[Entry] = []
        self._messages = 0
        self._chars = 0
        self._last_flush = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def add(self, entry: Entry) -> None:
        """Queue an entry; flush at once if the batch is full, else make sure a flush is scheduled."""
        self._pending.append(entry)
        self._messages += len(entry[1])
        self._chars += sum(len(text) + 1 for text in entry[1])
        if self._messages >= MAX_FRAME_MESSAGES or self._chars >= MAX_FRAME_CHARS:
            self.flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, self._last_flush + self._interval - loop.time()), self.flush)

    def flush(self) -> None:
        """Hand on everything pending, in order."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        self._messages = self._chars = 0
        self._last_flush = asyncio.get_running_loop().time()
        self._deliver(entries)

    def close(self) -> None:
        """Drop what is pending (its client left) and cancel the flush."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = []
