"""Durable consume loops against a real nats-server: a standing pull request hands each message over
as it arrives, survives request expiries and a broker restart, and never shows a status to a handler."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.msg import Msg
from nats.js import api

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import ProgressReported, decode_job_event
from visionyard.shared.natsserver import NatsServer

pytestmark = pytest.mark.integration

SPEC = streams.API_PROJECTOR


def progress(seq: int) -> ProgressReported:
    return ProgressReported(job_id="consume", attempt=1, seq=seq, epoch=seq, total_epochs=1000)


async def publish_through_outage(bus: Bus, seq: int) -> None:
    """Publish, retrying while the broker restarts (the test's publisher is not under test)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await bus.publish(progress(seq))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def until(condition: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def wait_for_ack_pending(bus: Bus, count: int) -> None:
    deadline = time.monotonic() + 10
    while (await bus.js.consumer_info(SPEC.stream, SPEC.durable)).num_ack_pending != count:
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


class Recorder:
    """A batch handler that acks everything and notes what it saw, when."""

    def __init__(self) -> None:
        self.calls: list[list[Msg]] = []
        self.handled_at: dict[int, float] = {}

    async def __call__(self, messages: list[Msg]) -> None:
        self.calls.append(messages)
        for msg in messages:
            self.handled_at[decode_job_event(msg.subject, msg.data).seq] = time.monotonic()
            await msg.ack()

    @property
    def seqs(self) -> list[int]:
        return [decode_job_event(m.subject, m.data).seq for call in self.calls for m in call]


def running(
    bus: Bus,
    handler: Callable[[list[Msg]], Awaitable[None]],
    stop: asyncio.Event,
    *,
    batch: int,
    linger: float = 0.0,
) -> asyncio.Task[None]:
    return asyncio.create_task(bus.consume_batches(SPEC, handler, stop=stop, batch=batch, linger=linger))


async def publish_and_wait(bus: Bus, recorder: Recorder, seq: int) -> float:
    """Publish event `seq` and wait until the handler has it; the seconds that took."""
    published_at = time.monotonic()
    await bus.publish(progress(seq))
    await until(lambda: seq in recorder.handled_at, timeout=10)
    return recorder.handled_at[seq] - published_at


async def test_a_lone_message_is_handled_as_soon_as_it_arrives(bus: Bus) -> None:
    # A quiet system: a job's single event must reach the projector at once, not when a pull that
    # keeps waiting for more ends (per-batch fetches: ~1 in 10 lone messages 0.1-0.6 s late).
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    await asyncio.sleep(0.3)
    rng = random.Random(7)
    latencies = []
    for seq in range(1, 41):
        await asyncio.sleep(rng.uniform(0.05, 0.35))  # idle again, at another phase each time
        latencies.append(await publish_and_wait(bus, recorder, seq))
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert max(latencies) < 0.1, sorted(latencies)[-5:]
    assert [len(call) for call in recorder.calls] == [1] * 40


async def test_messages_keep_flowing_across_request_expiries(bus: Bus) -> None:
    bus.pull_expires = 0.4
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    latencies = []
    for seq in range(1, 7):
        await asyncio.sleep(0.7)  # longer than a request lives: each message meets a renewed one
        latencies.append(await publish_and_wait(bus, recorder, seq))
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert recorder.seqs == [1, 2, 3, 4, 5, 6]
    # A request not renewed after its 408 would leave a message waiting for the lost-request watchdog.
    assert max(latencies) < 0.3, latencies


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "kill-9"])
async def test_messages_keep_flowing_across_a_broker_restart(bus: Bus, nats_server: NatsServer, kill: bool) -> None:
    # The restarted server has forgotten the standing request (a graceful stop says so with a 409; a
    # killed one says nothing): the loop must ask again at once, not when the request would have
    # expired (15 s here).
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    for seq in range(1, 21):
        await bus.publish(progress(seq))
    await until(lambda: len(recorder.seqs) == 20, timeout=10)
    await wait_for_ack_pending(bus, 0)
    await asyncio.to_thread(nats_server.stop, kill=kill)
    await asyncio.to_thread(nats_server.start)
    restarted_at = time.monotonic()
    for seq in range(21, 41):
        await publish_through_outage(bus, seq)
    await until(lambda: set(range(21, 41)) <= set(recorder.seqs), timeout=10)
    delivered_after = time.monotonic() - restarted_at
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert delivered_after < 8.0, delivered_after
    if kill:
        # A killed server may not have written the last acks it got, and redelivers those messages.
        assert sorted(set(recorder.seqs)) == list(range(1, 41))
        assert [seq for seq in recorder.seqs if seq > 20] == list(range(21, 41))
    else:
        assert recorder.seqs == list(range(1, 41))  # none lost, none twice


async def test_a_burst_reaches_a_batch_handler_in_few_calls(bus: Bus) -> None:
    for seq in range(1, 201):
        await bus.publish(progress(seq))
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=50)
    await until(lambda: len(recorder.seqs) == 200, timeout=10)
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert recorder.seqs == list(range(1, 201))
    assert max(len(call) for call in recorder.calls) == 50  # never more than `batch`
    assert len(recorder.calls) <= 10, [len(call) for call in recorder.calls]


async def test_linger_collects_a_trickle_and_hands_it_over_when_linger_has_passed(bus: Bus) -> None:
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=100, linger=1.0)
    await asyncio.sleep(0.3)
    first_at = time.monotonic()
    for seq in range(1, 6):
        await bus.publish(progress(seq))
        await asyncio.sleep(0.1)
    await until(lambda: len(recorder.seqs) == 5, timeout=10)
    handed_after = time.monotonic() - first_at
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert [len(call) for call in recorder.calls] == [5]
    # Handed over once `linger` had passed, not sooner and not when some later fetch deadline came.
    assert 0.9 < handed_after < 1.6, handed_after


async def test_stop_returns_delivered_but_unhandled_messages_at_once(bus: Bus) -> None:
    # A stopping replica must hand what it holds to another replica now, not after the ack wait (30 s).
    stop = asyncio.Event()
    release = asyncio.Event()
    first: list[list[Msg]] = []

    async def busy(messages: list[Msg]) -> None:
        first.append(messages)
        await release.wait()
        for msg in messages:
            await msg.ack()

    consumer = running(bus, busy, stop, batch=10)
    await bus.publish(progress(1))
    await until(lambda: bool(first), timeout=5)
    for seq in range(2, 7):
        await bus.publish(progress(seq))
    await wait_for_ack_pending(bus, 6)  # the five reached the stopping client
    stop.set()
    release.set()
    await asyncio.wait_for(consumer, 10)
    assert [decode_job_event(m.subject, m.data).seq for m in first[0]] == [1]

    second_stop = asyncio.Event()
    second = Recorder()
    started = time.monotonic()
    successor = running(bus, second, second_stop, batch=10)
    await until(lambda: len(second.seqs) == 5, timeout=10)
    taken_over_after = time.monotonic() - started
    second_stop.set()
    await asyncio.wait_for(successor, 10)
    assert sorted(second.seqs) == [2, 3, 4, 5, 6]
    assert all(m.metadata.num_delivered == 2 for call in second.calls for m in call)
    assert taken_over_after < 3.0, taken_over_after


async def test_status_messages_never_reach_handlers(bus: Bus) -> None:
    # 408s (short-lived requests) and 409s (a second loop over `max_waiting` = 1) are the loop's own.
    durable = "status-probe"
    await bus.js.add_consumer(SPEC.stream, config=api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=subjects.EVT_ALL, max_waiting=1,
    ))
    spec = streams.ConsumerSpec(stream=SPEC.stream, durable=durable, filter_subjects=(subjects.EVT_ALL,))
    bus.pull_expires = 0.3
    stop = asyncio.Event()
    seen: list[Msg] = []

    async def handle(msg: Msg) -> None:
        seen.append(msg)

    loops = [asyncio.create_task(bus.consume(spec, handle, stop=stop, batch=5)) for _ in range(2)]
    await asyncio.sleep(1.5)
    for seq in range(1, 4):
        await bus.publish(progress(seq))
        await asyncio.sleep(0.4)
    await until(lambda: len(seen) >= 3, timeout=10)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loops), 10)
    assert sorted(decode_job_event(m.subject, m.data).seq for m in seen) == [1, 2, 3]
    assert all(m.reply.startswith("$JS.ACK.") and m.data for m in seen)
