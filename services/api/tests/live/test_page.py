"""Which socket of a browser page carries the job, and where it starts (`live.page`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from visionyard.api.live import page as livepage
from visionyard.api.live.page import PageSockets, PageWriter, Resume

KEY = ("127.0.0.1", "http://localhost:3300", "HeadlessChrome", "1")


def _message(seq: int | None, kind: str = "training_log") -> str:
    body: dict[str, Any] = {"type": kind, "job_id": 1}
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body)


class _Socket:
    """A page socket as the endpoint wires it: what it wrote, where it was told to start, whether it was muted."""

    def __init__(self, age: float = 0.0) -> None:
        self.writer = PageWriter()
        self.writer.opened_at -= age
        self.written: list[Any] = []
        self.starts: list[Resume | None] = []
        self.muted = 0
        self.writer.carry = self._carry
        self.writer.mute = self._mute

    async def _carry(self, start: Resume | None) -> None:
        self.starts.append(start)
        self.writer.delivered = start or (0, 0)

    async def _mute(self) -> None:
        self.muted += 1

    async def send(self, message: str) -> None:
        await self.writer.write(message, self._write)

    async def _write(self, message: Any) -> None:
        self.written.append(message)


@pytest.fixture(autouse=True)
def _steady_after_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ages are set by hand (`_Socket(age=...)`); no timer the tests start fires while they run.
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 1.0)
    monkeypatch.setattr(livepage, "FALLBACK_SECONDS", 3600.0)


async def test_a_pages_messages_wait_for_a_socket_it_keeps_open_then_go_there_from_its_first_join() -> None:
    pages = PageSockets()
    render = _Socket()
    await pages.join(KEY, render.writer, live_from=99)
    assert not render.writer.carrying and render.starts == []  # no socket of the page has stayed open yet
    kept = _Socket()
    await pages.join(KEY, kept.writer, live_from=120)
    await pages.leave(KEY, render.writer)  # the render closed its socket: the other one is still there
    kept.writer.opened_at -= 5.0  # ... and stays open
    await pages._look_again(KEY)
    assert kept.writer.carrying and kept.starts == [(100, 0)]  # from the page's first join: nothing is skipped
    await kept.send(_message(None, "connected"))
    await kept.send(_message(112))
    assert kept.writer.delivered == (112, 1) and pages.elected == 1


async def test_the_next_carrier_starts_after_what_was_written_not_what_was_queued() -> None:
    pages = PageSockets()
    old, other = _Socket(age=5.0), _Socket(age=5.0)
    await pages.join(KEY, old.writer, live_from=10)
    await pages.join(KEY, other.writer, live_from=10)
    assert old.writer.carrying and not other.writer.carrying  # the oldest socket that stayed open carries
    await old.send(_message(None, "connected"))
    await old.send(_message(112))
    await other.send(_message(None, "connected"))
    assert other.written == []  # a socket that does not carry writes nothing
    await pages.leave(KEY, old.writer)
    assert other.starts == [(112, 1)] and old.muted == 1 and other.writer.carrying
    await old.send(_message(113))  # queued on the old socket as it closed: never written there
    assert old.written == [_message(None, "connected"), _message(112)]


async def test_a_carrier_closed_inside_an_event_leaves_the_rest_of_the_event_to_the_next() -> None:
    pages = PageSockets()
    old = _Socket(age=5.0)
    await pages.join(KEY, old.writer, live_from=100)
    await old.send(json.dumps({"type": "training_progress", "seq": 120}))
    await pages.leave(KEY, old.writer)  # closed between renders, after progress and before metrics
    later = _Socket(age=5.0)
    await pages.join(KEY, later.writer, live_from=130)
    assert later.starts == [(120, 1)]


async def test_a_page_whose_sockets_never_stay_open_gets_the_job_on_its_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(livepage, "FALLBACK_SECONDS", 0.0)
    pages = PageSockets()
    first, second = _Socket(), _Socket()
    await pages.join(KEY, first.writer, live_from=7)
    assert first.writer.carrying and first.starts == [(8, 0)]
    await first.send(_message(9))
    await pages.join(KEY, second.writer, live_from=9)
    assert second.writer.carrying and second.starts == [(9, 1)] and first.muted == 1


async def test_another_page_or_job_is_a_different_page() -> None:
    pages = PageSockets()
    one, two = _Socket(age=5.0), _Socket(age=5.0)
    await pages.join(KEY, one.writer, live_from=1)
    await pages.join((*KEY[:3], "2"), two.writer, live_from=1)
    assert one.writer.carrying and two.writer.carrying


async def test_a_socket_that_stays_open_is_looked_at_again_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(livepage, "STABLE_SECONDS", 0.05)
    pages = PageSockets()
    kept = _Socket()
    carrying = asyncio.Event()

    async def carry(start: Resume | None) -> None:
        carrying.set()

    kept.writer.carry = carry
    await pages.join(KEY, kept.writer, live_from=1)
    await asyncio.wait_for(carrying.wait(), timeout=10)  # the join's own timer elected it
    assert kept.writer.carrying
