"""Where a browser page's next socket starts (`livepage`): after what its previous socket wrote, per message."""

from __future__ import annotations

import json
from typing import Any

from visionyard.api.livepage import PageSockets, PageWriter

KEY = ("127.0.0.1", "http://localhost:3300", "HeadlessChrome", "1")


def _message(seq: int | None, kind: str = "training_log") -> str:
    body: dict[str, Any] = {"type": kind, "job_id": 1}
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body)


class _Socket:
    def __init__(self) -> None:
        self.written: list[Any] = []

    async def write(self, message: Any) -> None:
        self.written.append(message)


async def test_the_next_socket_starts_after_what_was_written_not_what_was_queued() -> None:
    pages = PageSockets()
    old = PageWriter(start=(10, 0))
    assert await pages.take_over(KEY, old) is None  # a page not seen lately
    socket = _Socket()
    for message in (_message(None, "connected"), _message(12)):
        assert await old.write(message, socket.write)
    muted: list[bool] = []

    async def mute() -> None:
        muted.append(True)

    old.mute = mute
    # Whatever the old socket's feed queued after seq 12 was never written: the new socket starts right after 12.
    assert await pages.take_over(KEY, PageWriter(start=(0, 0))) == (12, 1)
    assert muted == [True] and pages.takeovers == 1
    assert await old.write(_message(13), socket.write) is False  # a replaced socket writes nothing more
    assert await old.write(_message(None, "pong"), socket.write) is False
    assert socket.written == [_message(None, "connected"), _message(12)]


async def test_a_socket_replaced_inside_an_event_leaves_the_rest_of_the_event_to_the_next() -> None:
    pages = PageSockets()
    old = PageWriter(start=(20, 0))
    await pages.take_over(KEY, old)
    await old.write(_message(20, "training_progress"), _Socket().write)
    assert old.delivered == (20, 1)  # progress written, metrics of the same event not yet
    pages.release(old)  # the page closed it between renders
    assert await pages.take_over(KEY, PageWriter(start=(0, 0))) == (20, 1)


async def test_another_page_or_job_is_a_different_page() -> None:
    pages = PageSockets()
    one = PageWriter(start=(1, 0))
    await pages.take_over(KEY, one)
    await one.write(_message(5), _Socket().write)
    other_job = (*KEY[:3], "2")
    assert await pages.take_over(other_job, PageWriter(start=(0, 0))) is None
    assert not one.superseded.is_set()
