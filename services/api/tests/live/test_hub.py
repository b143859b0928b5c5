"""Shared live feeds: every client of a job gets exactly what its own replay would give, however late it joins,
one message per frame or batched."""

from __future__ import annotations

import asyncio
import json

import pytest

from visionyard.api.live import batch as livebatch
from visionyard.api.live.batch import Batcher, Frame, frame_after, frames_of, parse_batch_ms
from visionyard.api.live.feed import JobFeed, LiveConnection, LiveStats
from visionyard.api.live.hub import FeedHub, Listener, SharedJobFeed
from visionyard.shared.bus import Bus
from visionyard.shared.events import JobCompleted, JobQueued, JobStarted, ProgressReported


def _run(job_id: str, *, epochs: int) -> list:
    events: list = [JobQueued(job_id=job_id, attempt=1), JobStarted(job_id=job_id, attempt=1, seq=1, runner_id="r1")]
    events += [ProgressReported(job_id=job_id, attempt=1, seq=1 + epoch, epoch=epoch, total_epochs=epochs,
                                metrics={"loss": 1.0 / epoch}) for epoch in range(1, epochs + 1)]
    events.append(JobCompleted(job_id=job_id, attempt=1, seq=epochs + 2, total_epochs_completed=epochs,
                               final_metrics={}, best_metrics={}, best_epoch=epochs))
    return events


async def _reference(bus: Bus, job_id: str, last_seq: int | None) -> list[dict]:
    """What a client's own replay (`JobFeed`) sends from `last_seq`."""
    got: list[dict] = []

    async def collect(message: dict) -> None:
        got.append(message)

    feed = JobFeed(bus=bus, job_id=job_id, last_seq=last_seq, send=collect)
    await feed.start()
    await _until(lambda: any(m["type"] == "training_complete" for m in got))
    await feed.stop()
    return got


class _Client:
    """A LiveConnection writing into a list, as the WebSocket endpoint wires it."""

    def __init__(self, bus: Bus, hub: FeedHub) -> None:
        self.received: list[dict] = []
        self.frames: list[list[dict]] = []  # batched frames as they arrived
        self.connection = LiveConnection(bus=bus, write=self._write, stats=LiveStats(), hub=hub,
                                         write_text=self._write_text)

    async def _write(self, message: dict) -> None:
        self.received.append(message)

    async def _write_text(self, text: str) -> None:
        decoded = json.loads(text)
        if isinstance(decoded, list):
            self.frames.append(decoded)
            self.received.extend(decoded)
        else:
            self.received.append(decoded)

    def done(self) -> bool:
        return any(m["type"] == "training_complete" for m in self.received)


@pytest.mark.integration
@pytest.mark.parametrize("retain", [100_000, 8])
async def test_clients_joining_at_any_point_get_a_gap_free_duplicate_free_stream(bus: Bus, retain: int) -> None:
    job_id = f"hub{retain}"
    events = _run(job_id, epochs=40)
    hub = FeedHub(bus=bus, retain=retain, linger_seconds=0)  # no linger: the last client out closes the feed
    for event in events[:10]:
        await bus.publish(event)
    early = _Client(bus, hub)
    await early.connection.subscribe(job_id, last_seq=None)
    publishing = asyncio.create_task(_publish_slowly(bus, events[10:]))
    await _until(lambda: len(early.received) >= 30)
    # Joins mid-stream from the start, and resumes after a message it already had.
    late = _Client(bus, hub)
    await late.connection.subscribe(job_id, last_seq=None)
    cut = early.received[12]["seq"]
    resumed = _Client(bus, hub)
    await resumed.connection.subscribe(job_id, last_seq=cut)
    await publishing
    await _until(lambda: early.done() and late.done() and resumed.done())
    full = await _reference(bus, job_id, None)
    assert early.received == full
    assert late.received == full
    assert resumed.received == [m for m in full if m["seq"] > cut]
    for client in (early, late, resumed):
        await client.connection.close()
    assert hub.feeds == 0  # the last client out closed the job's feed


async def _publish_slowly(bus: Bus, events: list) -> None:
    for event in events:
        await bus.publish(event)
        await asyncio.sleep(0.005)


async def _until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.mark.integration
@pytest.mark.parametrize("retain", [100_000, 8])
async def test_batched_clients_get_exactly_the_per_message_stream_in_frames(bus: Bus, retain: int) -> None:
    # retain=8: the late joiner and the resumer are behind the shared history and get their own batched replay.
    job_id = f"batch{retain}"
    events = _run(job_id, epochs=40)
    hub = FeedHub(bus=bus, retain=retain)
    for event in events[:10]:
        await bus.publish(event)
    early = _Client(bus, hub)
    await early.connection.subscribe(job_id, last_seq=None, batch_ms=5)
    single = _Client(bus, hub)
    await single.connection.subscribe(job_id, last_seq=None)
    publishing = asyncio.create_task(_publish_slowly(bus, events[10:]))
    await _until(lambda: len(early.received) >= 30)
    late = _Client(bus, hub)
    await late.connection.subscribe(job_id, last_seq=None, batch_ms=1000)
    cut = early.received[12]["seq"]
    resumed = _Client(bus, hub)
    await resumed.connection.subscribe(job_id, last_seq=cut, batch_ms=20)
    await publishing
    await _until(lambda: all(client.done() for client in (early, single, late, resumed)))
    full = await _reference(bus, job_id, None)
    assert single.received == full and not single.frames  # the default contract is untouched
    assert early.received == full
    assert late.received == full
    assert resumed.received == [m for m in full if m["seq"] > cut]
    for client in (early, late, resumed):
        assert client.frames and all(frame for frame in client.frames)  # only arrays, never an empty one
    # A second of batching over a stream published in ~0.2 s: far fewer frames than messages.
    assert len(late.frames) < len(late.received) // 4
    for client in (early, single, late, resumed):
        await client.connection.close()
    # The feed lingers for a client that reconnects at once (the original frontend does on every render) ...
    assert hub.feeds == 1
    await hub.close()  # ... and closes at shutdown
    assert hub.feeds == 0


def _entry(seq: int, *kinds: str) -> tuple[int, list[str]]:
    return seq, [json.dumps({"type": kind, "seq": seq}) for kind in kinds or ("training_progress",)]


def _seqs(frames: list) -> list[int]:
    return [message["seq"] for frame in frames for message in json.loads(frame.text)]


async def test_a_batched_client_joining_while_a_flush_is_pending_gets_nothing_twice() -> None:
    feed = SharedJobFeed(bus=None, job_id="j", retain=1_000)  # type: ignore[arg-type]  # never started
    first: list = []
    joined: list = []
    ahead: list = []
    feed.attach(Listener(last_seq=None, offer=first.append, batch_ms=1000))
    # No await between these steps: the pending flush cannot run until we let it.
    for seq in (1, 2, 3):
        await feed.on_messages(seq, [{"type": "training_progress", "seq": seq}])
    feed.attach(Listener(last_seq=1, offer=joined.append, batch_ms=1000))  # 2 and 3 are pending
    feed.attach(Listener(last_seq=4, offer=ahead.append, batch_ms=1000))  # resumes past what the feed has
    for seq in (4, 5):
        await feed.on_messages(seq, [{"type": "training_progress", "seq": seq}])
    feed._groups[1000].batcher.flush()
    assert _seqs(first) == [1, 2, 3, 4, 5]
    assert len(first) == 1  # the whole burst in one frame
    assert _seqs(joined) == [2, 3, 4, 5]  # its catch-up, then only the part of the flush it lacked
    assert _seqs(ahead) == [5]
    assert all(isinstance(frame, Frame) for frame in first + joined + ahead)
    await feed.stop()


async def test_every_client_of_a_batch_group_gets_the_same_frame_encoded_once() -> None:
    feed = SharedJobFeed(bus=None, job_id="j", retain=1_000)  # type: ignore[arg-type]
    got: list[list] = [[], [], []]
    for offers in got:
        feed.attach(Listener(last_seq=None, offer=offers.append, batch_ms=20))
    await feed.on_messages(1, [{"type": "training_progress", "seq": 1}, {"type": "training_metrics", "seq": 1}])
    feed._groups[20].batcher.flush()
    assert got[0][0] is got[1][0] is got[2][0]
    assert json.loads(got[0][0].text) == [{"type": "training_progress", "seq": 1}, {"type": "training_metrics", "seq": 1}]
    await feed.stop()


async def test_batcher_sends_a_burst_in_one_delivery_in_order_and_flushes_a_full_batch_at_once() -> None:
    delivered: list[list] = []
    batcher = Batcher(batch_ms=1000, deliver=delivered.append)
    for seq in range(1, 6):
        batcher.add(_entry(seq))
    await _until(lambda: delivered)  # leading edge: an idle batch goes out on the next loop turn
    assert [[seq for seq, _ in entries] for entries in delivered] == [[1, 2, 3, 4, 5]]
    # Within the interval, a batch that reaches the frame bound goes out without waiting for the timer.
    for seq in range(6, 6 + livebatch.MAX_FRAME_MESSAGES):
        batcher.add(_entry(seq))
    assert [seq for seq, _ in delivered[1]] == list(range(6, 6 + livebatch.MAX_FRAME_MESSAGES))
    batcher.add(_entry(9_999))
    batcher.close()  # its client left: what is pending is dropped, no timer fires later
    await asyncio.sleep(0.05)
    assert len(delivered) == 2


def test_frames_keep_order_stay_within_bounds_and_never_split_an_event() -> None:
    entries = [_entry(seq, "training_progress", "training_metrics") for seq in range(1, 1_502)]
    frames = list(frames_of(entries))
    assert len(frames) > 1
    assert all(frame.messages <= livebatch.MAX_FRAME_MESSAGES for frame in frames)
    assert all(len(frame.text) <= livebatch.MAX_FRAME_CHARS + 2 for frame in frames)
    assert [message["seq"] for frame in frames for message in json.loads(frame.text)] == [
        seq for seq in range(1, 1_502) for _ in range(2)]
    assert [entry for frame in frames for entry in frame.entries] == entries


def test_frame_after_gives_only_what_a_client_lacks() -> None:
    frame = next(frames_of([_entry(seq) for seq in (3, 4, 5)]))
    assert frame_after(frame, 2) is frame
    assert frame_after(frame, 5) is None
    cut = frame_after(frame, 3)
    assert cut is not None and [m["seq"] for m in json.loads(cut.text)] == [4, 5]


@pytest.mark.parametrize(("value", "expected"), [(20, 20), ("20", 20), (0, 1), (5_000, 1000), ("1000", 1000)])
def test_batch_ms_is_clamped_to_a_sane_range(value: object, expected: int) -> None:
    assert parse_batch_ms(value) == expected


@pytest.mark.parametrize("value", ["abc", "", "-5", -5, 2.5, True, [20], {"ms": 20}])
def test_a_bad_batch_ms_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(ValueError, match="batch_ms"):
        parse_batch_ms(value)
