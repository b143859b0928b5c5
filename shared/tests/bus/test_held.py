"""A held message: heartbeats while its work runs, the broker-lost stop, settling through `decide_ack`.

Most tests hold a scripted fake message and drive the clock themselves, so each step waits on the
heartbeat that reached the message instead of on time passing; the last two hold a real one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus, PermanentError, TransientError
from visionyard.shared.bus.held import BrokerLost, HeldMessage
from visionyard.shared.commands import StartTraining
from visionyard.shared.natsserver import NatsServer

from .waits import until

SPEC = streams.with_ack_wait(streams.RUNNER, 10.0)


class Clock:
    """A clock the test moves; the heartbeat loop reads it to tell how long the broker was silent."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedMessage:
    """A delivered message whose every heartbeat waits for the test to say whether the broker took it."""

    delivered: int = 1
    subject: str = "cmd.train"
    data: bytes = b"{}"
    calls: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    answers: asyncio.Queue[bool] = field(default_factory=asyncio.Queue)
    settled: list[tuple[str, Any]] = field(default_factory=list)
    scripted: bool = True

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(num_delivered=self.delivered)

    async def in_progress(self) -> None:
        self.calls.put_nowait(None)
        if self.scripted and not await self.answers.get():
            raise ConnectionError("broker away")

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def term(self) -> None:
        self.settled.append(("term", None))

    async def beat(self, clock: Clock, *, at: float, ok: bool) -> None:
        """Wait for the next heartbeat, then answer it at time `at`."""
        await asyncio.wait_for(self.calls.get(), timeout=10)
        clock.now = at
        self.answers.put_nowait(ok)


def held(msg: ScriptedMessage, clock: Clock | None = None, **options: Any) -> HeldMessage:
    return HeldMessage(msg, spec=SPEC, heartbeat_seconds=0.01, clock=clock or Clock(), **options)


async def test_heartbeats_keep_coming_while_the_work_runs_and_stop_when_it_is_settled() -> None:
    msg = ScriptedMessage(scripted=False)
    async with held(msg) as holding:
        for _ in range(3):
            await asyncio.wait_for(msg.calls.get(), timeout=10)
        assert holding.beats >= 2
        decision = await holding.settle(None)
        assert holding._beating is None  # stopped before the ack, so no heartbeat can follow it
    assert (decision.action, msg.settled) == ("ack", [("ack", None)])


async def test_failed_heartbeats_shorter_than_the_ack_wait_are_ridden_out() -> None:
    clock, msg, stops = Clock(), ScriptedMessage(), []
    async with held(msg, clock, on_lost=lambda: stops.append("lost")) as holding:
        await msg.beat(clock, at=1.0, ok=True)
        await msg.beat(clock, at=5.0, ok=False)
        await msg.beat(clock, at=1.0 + SPEC.ack_wait, ok=False)  # exactly the ack wait: not over it yet
        await msg.beat(clock, at=12.0, ok=True)
        await msg.beat(clock, at=12.0 + SPEC.ack_wait - 0.5, ok=False)
        await asyncio.wait_for(msg.calls.get(), timeout=10)  # still beating: nothing was declared lost
        assert not holding.lost.is_set() and stops == []
        msg.answers.put_nowait(True)


async def test_the_broker_silent_for_longer_than_the_ack_wait_stops_the_work_once() -> None:
    clock, msg, stops = Clock(), ScriptedMessage(), []
    async with held(msg, clock, on_lost=lambda: stops.append("lost")) as holding:
        await msg.beat(clock, at=1.0, ok=True)
        await msg.beat(clock, at=4.0, ok=False)
        await msg.beat(clock, at=1.0 + SPEC.ack_wait + 0.1, ok=False)
        await asyncio.wait_for(holding.lost.wait(), timeout=10)
        assert stops == ["lost"]
        assert msg.calls.empty() and holding._beating is not None and holding._beating.done()  # no beats after


async def test_run_cancels_the_work_when_the_broker_is_lost_and_returns_its_result_otherwise() -> None:
    clock, msg = Clock(), ScriptedMessage()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def answer() -> str:
        return "done"

    async with held(msg, clock) as holding:
        assert await holding.run(answer()) == "done"
        running = asyncio.create_task(holding.run(forever()))
        await msg.beat(clock, at=SPEC.ack_wait + 1.0, ok=False)
        with pytest.raises(BrokerLost, match="cmd.train"):
            await asyncio.wait_for(running, timeout=10)
    assert cancelled.is_set()
    # Left unsettled: JetStream redelivers it (a nak of the stale delivery would deliver it twice).
    assert holding.left and msg.settled == []


@dataclass
class DeadLetters:
    parked: list[tuple[str, str]] = field(default_factory=list)
    failing: bool = False

    async def __call__(self, msg: Any, *, consumer: str, reason: str) -> None:
        if self.failing:
            raise ConnectionError("broker away")
        self.parked.append((consumer, reason))


@pytest.mark.parametrize(("error", "delivered", "expected", "parked"), [
    (None, 1, ("ack", None), False),
    (PermanentError("not a command"), 1, ("term", None), True),
    (TransientError("storage away"), 1, ("nak", SPEC.backoff_base), False),
    (TransientError("storage away"), 3, ("nak", SPEC.backoff_base * 4), False),
    (TransientError("storage away"), SPEC.max_deliver, ("term", None), True),
])
async def test_settling_follows_decide_ack(error: BaseException | None, delivered: int, expected: tuple[str, Any],
                                           parked: bool) -> None:
    msg, letters = ScriptedMessage(delivered=delivered, scripted=False), DeadLetters()
    async with held(msg, dead_letter=letters) as holding:
        assert holding.delivered == delivered
        assert holding.final_delivery is (delivered >= SPEC.max_deliver)
        await holding.settle(error)
    assert msg.settled == [expected]
    assert letters.parked == ([(SPEC.durable, str(error))] if parked else [])


async def test_a_message_that_could_not_be_dead_lettered_is_not_terminated() -> None:
    msg = ScriptedMessage(scripted=False)
    async with held(msg, dead_letter=DeadLetters(failing=True)) as holding:
        await holding.settle(PermanentError("not a command"))
    assert msg.settled == []  # redelivered after the ack wait, and parked then


async def test_hand_back_naks_without_backoff() -> None:
    msg = ScriptedMessage(scripted=False)
    async with held(msg) as holding:
        await holding.hand_back()
    assert msg.settled == [("nak", None)]


class AnsweredAsCancelled:
    """A message whose heartbeat is a request under `asyncio.wait_for`, as nats-py sends it."""

    delivered, subject = 1, "cmd.train"
    metadata = SimpleNamespace(num_delivered=1)

    def __init__(self) -> None:
        self.waiting: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def in_progress(self) -> None:
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.put_nowait(answer)
        await asyncio.wait_for(answer, timeout=30)


async def test_heartbeats_stop_when_the_stop_arrives_with_a_heartbeats_answer() -> None:
    # On Python 3.11 `wait_for` returns the answer and drops a cancel that arrives with it: a heartbeat loop
    # stopped by one cancel went on beating, and whoever stopped it (a runner shutting down) waited for ever.
    msg = AnsweredAsCancelled()
    holding = HeldMessage(msg, spec=SPEC, heartbeat_seconds=0.01)  # type: ignore[arg-type]
    async with holding:
        beating = holding._beating
        answer = await asyncio.wait_for(msg.waiting.get(), timeout=10)
        answer.set_result(None)  # the answer is in, its waiter not yet woken: the cancel below races it
        stopping = asyncio.create_task(holding.stop_heartbeats())
        try:
            # Not wait_for: its own cancel at the timeout would stop the loop and hide the hang.
            done, _ = await asyncio.wait({stopping}, timeout=10)
            assert stopping in done, "stopping the heartbeats hung: the loop had lost its cancel"
        finally:
            stopping.cancel()
    assert beating is not None and beating.done()


def test_a_heartbeat_not_shorter_than_the_ack_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="heartbeat_seconds must be < the ack wait of runner"):
        HeldMessage(ScriptedMessage(), spec=SPEC, heartbeat_seconds=SPEC.ack_wait)
    with pytest.raises(ValueError, match="heartbeat_seconds must be > 0"):
        HeldMessage(ScriptedMessage(), spec=SPEC, heartbeat_seconds=0)


# -- a real broker ------------------------------------------------------------------------------


async def claim(bus: Bus, spec: streams.ConsumerSpec) -> Any:
    await bus.declare_consumer(spec)
    await bus.publish(StartTraining.model_validate({
        "job_id": "held", "attempt": 1, "project_id": "p", "experiment_name": "e",
        "config": {"framework": "fake", "model_name": "fake", "task_type": "image_classification",
                   "dataset_id": "d", "epochs": 1},
        "dataset": {"dataset_id": "d", "content_hash": "0" * 64},
    }), subject=subjects.CMD_TRAIN)
    subscription = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    [msg] = await subscription.fetch(1, timeout=10)
    return msg


@pytest.mark.integration
async def test_confirmed_heartbeats_hold_a_message_past_its_ack_wait(bus: Bus) -> None:
    spec = streams.with_ack_wait(streams.RUNNER, 1.0)
    msg = await claim(bus, spec)
    async with HeldMessage(msg, spec=spec, heartbeat_seconds=0.2) as holding:
        await until(lambda: holding.beats >= 8, timeout=30)  # over 1.5 ack waits of heartbeats
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        assert (info.num_ack_pending, info.num_redelivered) == (1, 0)
        await holding.settle(None)
    for _ in range(100):  # the ack is fire-and-forget: look until the server has it
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


@pytest.mark.integration
async def test_a_broker_gone_for_longer_than_the_ack_wait_is_noticed_although_the_client_buffers_heartbeats(
    nats_server: NatsServer, bus: Bus
) -> None:
    spec = streams.with_ack_wait(streams.RUNNER, 1.0)
    msg = await claim(bus, spec)
    stops: list[str] = []
    async with HeldMessage(msg, spec=spec, heartbeat_seconds=0.2, on_lost=lambda: stops.append("lost")) as holding:
        await until(lambda: holding.beats >= 1, timeout=10)
        nats_server.stop()
        # nats-py's own `in_progress` would keep returning while it reconnects; confirmed beats do not.
        await asyncio.wait_for(holding.lost.wait(), timeout=30)
    assert stops == ["lost"]
    nats_server.restart()  # so the bus fixture closes on a live broker
    await until(lambda: bus.nc.is_connected, timeout=30)
