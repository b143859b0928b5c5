"""Which socket of a browser page carries the job, and where it starts (`livepage`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from visionyard.api import livepage
from visionyard.api.livepage import PageSockets, PageWriter, Resume

KEY = ("127.0.0.1", "http://localhost:3300", "HeadlessChrome", "1")


def _message(seq: int | None, kind: str = "training_log") -> str:
    body: dict[str, Any] = {"type": kind, "job_id": 1}
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body)


class _Socket:
    """A page socket as the endpoint wires it: what it wrote, where it was told to start, whether it was muted."""

    def __init__(self) -> None:
        self.writer = PageWriter()
        self.written: list[Any] = []
        self.starts: list[Resume | None] = []
        self.muted = 0
        self.writer.carry = self._carry
        self.writer.mute = self._mute

    async def _carry(self, start: Resume | None) -> None:
        self.starts.append(start)
        self.writer.delivered = (start or (100, 0))

    async def _mute(self) -> None:
        self.muted += 1

    async def send(self, message: str) -> None:
        await self.writer.write(message, self._write)

    async def _write(self, message: Any) -> None:
        self.written.append(message)


async def test_the_next_carrier_starts_after_what_was_written_not_what_was_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 3600.0)
    pages = PageSockets()
    old, new = _Socket(), _Socket()
    await pages.join(KEY, old.writer)
    assert old.starts == [None] and old.writer.carrying  # a page not seen lately: live from now
    await old.send(_message(None, "connected"))
    await old.send(_message(112))
    await pages.join(KEY, new.writer)  # the re-render's socket takes over from the young one
    assert new.starts == [(112, 1)] and old.muted == 1 and pages.handovers == 1
    await old.send(_message(113))  # queued on the old socket before it was muted: never written there
    await old.send(_message(None, "pong"))
    assert old.written == [_message(None, "connected"), _message(112)]


async def test_a_socket_replaced_inside_an_event_leaves_the_rest_of_the_event_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 3600.0)
    pages = PageSockets()
    old = _Socket()
    await pages.join(KEY, old.writer)
    await old.send(json.dumps({"type": "training_progress", "seq": 120}))
    await pages.leave(KEY, old.writer)  # closed between renders, after progress and before metrics
    later = _Socket()
    await pages.join(KEY, later.writer)
    assert later.starts == [(120, 1)]


async def test_a_kept_socket_carries_and_a_closed_carrier_passes_to_the_oldest_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 0.0)
    pages = PageSockets()
    kept, render, other = _Socket(), _Socket(), _Socket()
    await pages.join(KEY, kept.writer)
    await pages.join(KEY, render.writer)
    await pages.join(KEY, other.writer)
    assert kept.writer.carrying and not render.writer.carrying and not other.writer.carrying
    await kept.send(_message(5))
    await render.send(_message(None, "connected"))
    assert render.written == []
    await pages.leave(KEY, render.writer)  # a silent socket leaving changes nothing
    assert kept.writer.carrying and pages.handovers == 0
    await pages.leave(KEY, kept.writer)
    assert other.writer.carrying and other.starts == [(5, 1)]


async def test_once_a_page_keeps_a_socket_open_it_takes_the_job_from_a_young_carrier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 1.0)
    pages = PageSockets()
    leaked, young = _Socket(), _Socket()
    await pages.join(KEY, leaked.writer)
    await pages.join(KEY, young.writer)
    assert young.writer.carrying  # neither has stayed open yet: the newest carries
    await young.send(_message(9))
    leaked.writer.opened_at -= 10.0  # time passes: the page never closed `leaked`; `young` is a render's socket
    newest = _Socket()
    await pages.join(KEY, newest.writer)
    assert leaked.writer.carrying and leaked.starts == [None, (9, 1)]
    assert not young.writer.carrying and not newest.writer.carrying and young.muted == 1


async def test_another_page_or_job_is_a_different_page() -> None:
    pages = PageSockets()
    one, two = _Socket(), _Socket()
    await pages.join(KEY, one.writer)
    await pages.join((*KEY[:3], "2"), two.writer)
    assert one.writer.carrying and two.writer.carrying and pages.handovers == 0
