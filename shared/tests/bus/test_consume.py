"""The standing pull (`Bus.pull_loop`, what feeds every durable consumer's FastStream subscriber) against a real
nats-server: a standing pull request hands each message over as it arrives, survives request expiries and a
broker restart, and never shows a status to a handler.

The handlers here take the pulled messages as the subscriber's `consume` would, and ack them themselves (the
settling middleware's part: shared/tests/bus/test_broker.py).

No assertion reads a clock. Where a test is about "at once", the slow alternative is made to take
longer than the test's bound on waiting (a request that outlives the test, an ack wait of minutes),
and the loop's own traffic (its pull requests, its logs, the consumer's state) shows which path it took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from nats.aio.msg import Msg
from nats.js import api

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import ProgressReported, decode_job_event
from visionyard.shared.natsserver import NatsServer

from .waits import until, until_consumer

pytestmark = pytest.mark.integration

SPEC = streams.API_PROJECTOR
WAIT = 30.0  # the bound on any wait: a broken loop fails the test instead of hanging it
# Outlives any test here: a message that waited for its pull request to end would exceed WAIT.
LONG_EXPIRES = 600.0


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


async def wait_for_ack_pending(bus: Bus, count: int, spec: streams.ConsumerSpec = SPEC) -> None:
    await until_consumer(bus, spec, lambda info: info.num_ack_pending == count, timeout=WAIT)


async def standing(bus: Bus, spec: streams.ConsumerSpec = SPEC) -> None:
    """Until a standing pull's request waits on the server: from then on a message is delivered."""
    await until_consumer(bus, spec, lambda info: bool(info.num_waiting), timeout=WAIT)


async def settled(bus: Bus) -> None:
    """Until the consumer has nothing left to deliver and nothing unacknowledged: no delivery can follow."""
    await until_consumer(bus, SPEC, lambda info: info.num_pending == 0 and info.num_ack_pending == 0, timeout=WAIT)


class PullRequests:
    """The pull requests sent to a consumer, seen by a subscription of the test's own on their subject."""

    def __init__(self) -> None:
        self.count = 0

    @classmethod
    async def watch(cls, bus: Bus, spec: streams.ConsumerSpec = SPEC) -> PullRequests:
        requests = cls()

        async def seen(_: Msg) -> None:
            requests.count += 1

        await bus.nc.subscribe(f"{bus.js._prefix}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}", cb=seen)
        await bus.nc.flush()  # the server has the subscription before the loop asks
        return requests


def lost_requests(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the lost-request watchdog said: it renews a request nobody answered past its expiry."""
    return [record.getMessage() for record in caplog.records if "lost; asking again" in record.getMessage()]


class Recorder:
    """A batch handler that acks everything and notes what it saw."""

    def __init__(self) -> None:
        self.calls: list[list[Msg]] = []

    async def __call__(self, messages: list[Msg]) -> None:
        self.calls.append(messages)
        for msg in messages:
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
    spec: streams.ConsumerSpec = SPEC,
) -> asyncio.Task[None]:
    return asyncio.create_task(bus.pull_loop(spec, handler, stop=stop, batch=batch, linger=linger))


async def publish_and_wait(bus: Bus, recorder: Recorder, seq: int) -> None:
    """Publish event `seq` and wait until the handler has it."""
    await bus.publish(progress(seq))
    await until(lambda: seq in recorder.seqs, timeout=WAIT)


async def test_a_lone_message_is_handled_as_soon_as_it_arrives(bus: Bus) -> None:
    # A quiet system: a job's single event must reach the projector at once, not when a pull that
    # keeps waiting for more ends (per-batch fetches held ~1 in 10 lone messages 0.1-0.6 s). Here the
    # request outlives the test, so only a loop that hands over what has arrived gets each message
    # within WAIT, and the one request asked for at the start serves them all.
    bus.pull_expires = LONG_EXPIRES
    requests = await PullRequests.watch(bus)
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    await standing(bus)
    for seq in range(1, 21):
        await publish_and_wait(bus, recorder, seq)
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert [len(call) for call in recorder.calls] == [1] * 20
    assert requests.count == 1


async def test_messages_keep_flowing_across_request_expiries(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="visionyard")
    bus.pull_expires = 0.4
    requests = await PullRequests.watch(bus)
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    for seq in range(1, 7):
        # Each message (after the first) meets a request asked for after the one before it expired.
        asked = requests.count
        await until(lambda asked=asked: requests.count > asked, timeout=WAIT)
        await publish_and_wait(bus, recorder, seq)
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert recorder.seqs == [1, 2, 3, 4, 5, 6]
    # Renewed on each 408: a request not renewed then is renewed only by the lost-request watchdog.
    assert lost_requests(caplog) == []


@pytest.mark.parametrize("kill", [False, True], ids=["graceful", "kill-9"])
async def test_messages_keep_flowing_across_a_broker_restart(bus: Bus, nats_server: NatsServer, kill: bool) -> None:
    # The restarted server has forgotten the standing request (a graceful stop says so with a 409; a
    # killed one says nothing): the loop must ask again at once, not when the request would have
    # expired (after the test's bound on waiting here).
    bus.pull_expires = LONG_EXPIRES
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=500)
    for seq in range(1, 21):
        await bus.publish(progress(seq))
    await until(lambda: len(recorder.seqs) == 20, timeout=10)
    await wait_for_ack_pending(bus, 0)
    await asyncio.to_thread(nats_server.stop, kill=kill)
    await asyncio.to_thread(nats_server.start)
    for seq in range(21, 41):
        await publish_through_outage(bus, seq)
    await until(lambda: set(range(21, 41)) <= set(recorder.seqs), timeout=WAIT)
    if kill:
        # What a killed server forgot it had acked comes back only after the ack wait: all delivered is enough.
        await until_consumer(bus, SPEC, lambda info: info.num_pending == 0, timeout=WAIT)
    else:
        await settled(bus)  # every delivery handled and acked: a duplicate would have shown up by now
    stop.set()
    await asyncio.wait_for(consumer, 10)
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
    sizes = [len(call) for call in recorder.calls]
    # Never more than `batch` in a call, and batched: how many arrive together depends on the machine's load
    # (on a busy one the 50 of a pull arrive in parts), so the bound on calls is loose.
    assert 1 < max(sizes) <= 50 and len(sizes) <= 40, sizes


async def test_linger_collects_a_trickle_and_hands_it_over_when_linger_has_passed(bus: Bus) -> None:
    # The request outlives the test and the batch (100) is never full: linger is the only thing that
    # can end the collecting, so a handover within WAIT is linger's doing.
    bus.pull_expires = LONG_EXPIRES
    stop = asyncio.Event()
    recorder = Recorder()
    consumer = running(bus, recorder, stop, batch=100, linger=5.0)
    await standing(bus)
    await bus.publish(progress(1))
    await wait_for_ack_pending(bus, 1)  # the first is with the loop: from here it lingers
    for seq in range(2, 6):
        await bus.publish(progress(seq))
    await wait_for_ack_pending(bus, 5)
    assert recorder.calls == [], "handed over before linger had passed"
    await until(lambda: len(recorder.seqs) == 5, timeout=WAIT)
    stop.set()
    await asyncio.wait_for(consumer, 10)
    assert [len(call) for call in recorder.calls] == [5]


async def test_stop_returns_delivered_but_unhandled_messages_at_once(bus: Bus) -> None:
    # A stopping replica must hand what it holds to another replica now, not after the ack wait (here
    # longer than the test's bound on waiting, so a successor gets them within WAIT only if returned).
    spec = replace(SPEC, durable="stop-probe", ack_wait=LONG_EXPIRES)
    await bus.js.add_consumer(spec.stream, config=streams.consumer_config(spec))
    stop = asyncio.Event()
    release = asyncio.Event()
    first: list[list[Msg]] = []

    async def busy(messages: list[Msg]) -> None:
        first.append(messages)
        await release.wait()
        for msg in messages:
            await msg.ack()

    consumer = running(bus, busy, stop, batch=10, spec=spec)
    await bus.publish(progress(1))
    await until(lambda: bool(first), timeout=WAIT)
    for seq in range(2, 7):
        await bus.publish(progress(seq))
    await wait_for_ack_pending(bus, 6, spec)  # the five reached the stopping client
    stop.set()
    release.set()
    await asyncio.wait_for(consumer, 10)
    assert [decode_job_event(m.subject, m.data).seq for m in first[0]] == [1]

    second_stop = asyncio.Event()
    second = Recorder()
    successor = running(bus, second, second_stop, batch=10, spec=spec)
    await until(lambda: len(second.seqs) == 5, timeout=WAIT)
    second_stop.set()
    await asyncio.wait_for(successor, 10)
    assert sorted(second.seqs) == [2, 3, 4, 5, 6]
    assert all(m.metadata.num_delivered == 2 for call in second.calls for m in call)


async def test_status_messages_never_reach_handlers(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    # 408s (short-lived requests) and 409s (a second loop over `max_waiting` = 1) are the loop's own.
    caplog.set_level(logging.INFO, logger="visionyard")
    durable = "status-probe"
    await bus.js.add_consumer(SPEC.stream, config=api.ConsumerConfig(
        durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, filter_subject=subjects.EVT_ALL, max_waiting=1,
    ))
    spec = streams.ConsumerSpec(stream=SPEC.stream, durable=durable, filter_subjects=(subjects.EVT_ALL,))
    bus.pull_expires = 0.3
    requests = await PullRequests.watch(bus, spec)
    stop = asyncio.Event()
    seen: list[Msg] = []

    async def handle(messages: list[Msg]) -> None:
        for msg in messages:
            seen.append(msg)
            await msg.ack()

    loops = [asyncio.create_task(bus.pull_loop(spec, handle, stop=stop, batch=5)) for _ in range(2)]
    for seq in range(1, 4):
        # Each message after a few more requests: each one after the first two follows a 408 or a 409.
        asked = requests.count
        await until(lambda asked=asked: requests.count >= asked + 3, timeout=WAIT)
        await bus.publish(progress(seq))
    await until(lambda: len(seen) >= 3, timeout=WAIT)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*loops), 10)
    assert sorted(decode_job_event(m.subject, m.data).seq for m in seen) == [1, 2, 3]
    assert all(m.reply.startswith("$JS.ACK.") and m.data for m in seen)
    # The statuses came (a 409 is logged as refused) and went to the loops only.
    assert any("refused: 409" in record.getMessage() for record in caplog.records)
