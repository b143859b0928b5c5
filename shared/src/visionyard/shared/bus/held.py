"""One long-held message: kept alive by heartbeats, stopped when the broker is lost, settled once.

Training, export and inference commands (the runner) and storage's checkpoint, ingest and delete
messages are held unacknowledged for minutes while their work runs. Each needs the same three things,
which used to live in three drifted copies:

- an `in_progress` heartbeat every `heartbeat_seconds`, so JetStream does not redeliver the message
  to another consumer while the work is still going;
- the broker-lost stop: once no heartbeat has been confirmed for longer than the consumer's ack wait,
  JetStream may have handed the message to someone else, so the held work must stop (two trainers or
  two exports of one job must not race);
- settling through `decide_ack` (ack, nak with backoff, or dead-letter and terminate).

A heartbeat counts only when the server confirmed it. nats-py's `in_progress` is fire-and-forget, and
while the client is reconnecting it buffers the publish and returns as if sent: a runner cut off from
the broker saw every heartbeat succeed and never stopped. A NATS message's heartbeat is therefore sent
as a request (the server answers an ack that carries a reply subject).

No NATS import here: the message is typed by the `Delivered` Protocol (settle.py), so tests hold a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from visionyard.shared import streams
from visionyard.shared.bus.errors import AckAction, AckDecision, TransientError
from visionyard.shared.bus.settle import DeadLetter, Delivered, delivery_count, mark_settled, settle
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.bus.held")

T = TypeVar("T")

# The body of a JetStream "still working" ack.
PROGRESS = b"+WPI"


class BrokerLost(TransientError):
    """The broker confirmed no heartbeat for longer than the ack wait: the message may be someone else's now."""


async def confirmed_progress(msg: Delivered, *, timeout: float) -> None:
    """A heartbeat that returns only once the server has it, and raises otherwise.

    nats-py's `Msg` keeps its client and reply subject; sending `+WPI` as a request makes the server
    answer. Any other message (a test's fake) is trusted to raise from `in_progress` when it fails.
    """
    client: Any = getattr(msg, "_client", None)
    reply = getattr(msg, "reply", "")
    if client is None or not reply:
        await msg.in_progress()
        return
    await client.request(reply, PROGRESS, timeout=timeout)


class HeldMessage:
    """Holds one delivered message while its work runs: heartbeats, the broker-lost stop, settling.

    ```
    async with HeldMessage(msg, spec=spec, heartbeat_seconds=20, on_lost=stop_the_work) as held:
        outcome = await held.run(work())      # or await the work directly and rely on `on_lost`
    await held.settle(error)                  # or held.hand_back(), or held.leave()
    ```

    `lost` is set (and `on_lost` called once) when no heartbeat has been confirmed for longer than the
    consumer's ack wait; `run` then cancels the work it runs, leaves the delivery unsettled (`leave`) and
    raises `BrokerLost`.
    """

    def __init__(
        self,
        msg: Delivered,
        *,
        spec: streams.ConsumerSpec,
        heartbeat_seconds: float,
        dead_letter: DeadLetter | None = None,
        on_lost: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds must be > 0, got {heartbeat_seconds}")
        if heartbeat_seconds >= spec.ack_wait:
            raise ValueError(
                f"heartbeat_seconds must be < the ack wait of {spec.durable} ({spec.ack_wait}s), got {heartbeat_seconds}"
            )
        self.msg = msg
        self.spec = spec
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = asyncio.Event()
        # Confirmed heartbeats so far (what a log line or a test reads).
        self.beats = 0
        self._dead_letter = dead_letter
        self._on_lost = on_lost
        self._clock = clock
        self._beating: asyncio.Task[None] | None = None
        self.settled: AckDecision | None = None
        # Left unsettled on purpose (`leave`).
        self.left = False

    @property
    def delivered(self) -> int:
        """This delivery's number (1 for the first)."""
        return delivery_count(self.msg)

    @property
    def final_delivery(self) -> bool:
        """Whether JetStream will not deliver the message again after this delivery."""
        return self.spec.max_deliver > 0 and self.delivered >= self.spec.max_deliver

    async def __aenter__(self) -> Self:
        self._beating = asyncio.create_task(self._keep_alive())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop_heartbeats()

    async def stop_heartbeats(self) -> None:
        """Stop beating (the work is over, or the message is about to be settled)."""
        if self._beating is not None:
            # A heartbeat is a request under `wait_for`, which can drop one cancel on Python 3.11 (tasks.py).
            await cancel_all([self._beating])
            self._beating = None

    async def run(self, work: Awaitable[T]) -> T:
        """`work`'s result; cancelled, raising `BrokerLost`, if the broker is lost first (the delivery is then
        left to JetStream's redelivery: `leave`)."""
        task = asyncio.ensure_future(work)
        lost = asyncio.create_task(self.lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                await cancel_all([task])
        if task.cancelled():
            await self.leave()  # not settled: the settling middleware sees it settled and leaves it alone too
            raise BrokerLost(
                f"no heartbeat of {self.msg.subject} confirmed for over {self.spec.ack_wait}s: work cancelled"
            )
        return task.result()

    async def settle(self, error: BaseException | None) -> AckDecision:
        """Ack, nak with backoff, or dead-letter and terminate, as `decide_ack` says for `error`."""
        await self.stop_heartbeats()
        self.settled = await settle(self.msg, self.spec, error, dead_letter=self._dead_letter,
                                    delivered=self.delivered)
        return self.settled

    async def hand_back(self) -> None:
        """Nak at once, without backoff: the work stopped unfinished and another consumer takes it over."""
        await self.stop_heartbeats()
        try:
            await self.msg.nak()
        except Exception as error:  # the broker redelivers after the ack wait
            log.warning("could not hand %s back: %s", self.msg.subject, error)
        self.settled = AckDecision(AckAction.NAK)

    async def leave(self) -> None:
        """Settle nothing: this delivery is no longer ours (the broker was lost for longer than the ack wait, or
        the message has been redelivered since).

        JetStream redelivers it, or already has. An ack would drop work not done; a nak of a stale delivery
        is taken for the message whichever delivery it names, so it would deliver the message once more
        beside the redelivery already under way (two runs of one job).
        """
        await self.stop_heartbeats()
        mark_settled(self.msg)
        self.left = True

    async def _keep_alive(self) -> None:
        last_confirmed = self._clock()
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await confirmed_progress(self.msg, timeout=self.heartbeat_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                silent = self._clock() - last_confirmed
                log.warning("heartbeat of %s failed (%.1fs unconfirmed): %s", self.msg.subject, silent,
                            str(error) or type(error).__name__)
                if silent > self.spec.ack_wait:
                    self._lose()
                    return
                continue
            last_confirmed = self._clock()
            self.beats += 1

    def _lose(self) -> None:
        log.warning("broker lost for over the ack wait of %s: stopping the work on %s", self.spec.durable,
                    self.msg.subject)
        self.lost.set()
        if self._on_lost is not None:
            self._on_lost()
