"""The `cmd.train` consumer: claim commands while a slot is free, hold them unacked with heartbeats, settle.

Ack timing is the whole point of this module: a command is acked only after its terminal event is
stored, nak'ed (no terminal event) when the runner shuts down so another runner resumes the job,
and dead-lettered only when it cannot be decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from visionyard.runner.devices import GpuPool, advertise, withdraw
from visionyard.runner.ship_handlers import SHIP_SUBJECTS, ShipCommandHandler
from visionyard.runner.service import AttemptOutcome, StopReason, TrainingAttempts
from visionyard.shared import metrics, streams, tracing
from visionyard.shared.bus import AckAction, Bus, PermanentError, decide_ack
from visionyard.shared.commands import StartTraining
from visionyard.shared.logs import job_context
from visionyard.shared.devices import MAX_GPUS_PER_JOB

log = logging.getLogger("visionyard.runner.handlers")


class TrainCommandConsumer:
    """Pulls `cmd.train` one message at a time, never holding more than `slots` jobs."""

    def __init__(
        self,
        bus: Bus,
        attempts: TrainingAttempts,
        *,
        slots: int,
        heartbeat_seconds: float,
        spec: streams.ConsumerSpec = streams.RUNNER,
        shipping: ShipCommandHandler | None = None,
        gpu_pool: GpuPool | None = None,
        runner_id: str = "",
        advertise_seconds: float = 5.0,
    ) -> None:
        self._bus = bus
        self._shipping = shipping
        self._gpu_pool = gpu_pool or GpuPool(gpus=[])
        self._runner_id = runner_id
        self._slot_count = slots
        self._attempts = attempts
        self._slots = asyncio.Semaphore(slots)
        self._heartbeat = heartbeat_seconds
        self._spec = spec
        self._tasks: set[asyncio.Task[None]] = set()
        self._advertise_seconds = advertise_seconds
        # Export and inference commands are not scheduled (they share this consumer and its slots directly):
        # the advertisement says how many slots they hold, so the scheduler does not count those as free.
        self._ship_held = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run commands until `stop`; then stop held trainers and hand their commands back."""
        subscription = await self._bus.js.pull_subscribe_bind(durable=self._spec.durable, stream=self._spec.stream)
        gpu_subscriptions = {
            count: await self._bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
            for count, spec in self._gpu_specs().items()
        }
        await self._advertise()
        renewing = asyncio.create_task(self._keep_advertising(stop))
        tracked = [self._spec, *self._gpu_specs().values()]
        for spec in tracked:
            metrics.CONSUMERS.track(self._bus, spec)
        try:
            while not stop.is_set():
                if not await self._acquire_slot(stop):
                    break
                claimed = await self._claim_gpu_command(gpu_subscriptions)
                if claimed is not None:
                    msg, gpus = claimed
                    task = asyncio.create_task(self.hold(msg, gpus=gpus))
                    self._tasks.add(task)
                    task.add_done_callback(self._job_done)
                    continue
                try:
                    # With GPU consumers to poll too, a CPU fetch must not keep them waiting long.
                    messages = await subscription.fetch(1, timeout=0.5 if gpu_subscriptions else 1.0)
                except (NatsTimeoutError, asyncio.TimeoutError):
                    self._slots.release()
                    continue
                except Exception as error:  # broker away: keep trying, never exit
                    self._slots.release()
                    log.warning("fetch failed: %s", error)
                    await asyncio.sleep(0.5)
                    continue
                if not messages:
                    self._slots.release()
                    continue
                for index, msg in enumerate(messages):
                    if index:
                        await self._slots.acquire()  # fetch(1) returns one; stay correct if it ever returns more
                    task = asyncio.create_task(self.hold(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._job_done)
        finally:
            renewing.cancel()
            for spec in tracked:
                metrics.CONSUMERS.untrack(self._bus, spec)
            self._attempts.held.stop_all(StopReason.SHUTDOWN)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            for gpu_subscription in gpu_subscriptions.values():
                with contextlib.suppress(Exception):
                    await gpu_subscription.unsubscribe()
            await withdraw(self._bus, runner_id=self._runner_id)

    def _gpu_specs(self) -> dict[int, streams.ConsumerSpec]:
        """The GPU consumers this runner serves: one per job size it can ever hold (devices.py)."""
        most = min(self._gpu_pool.total, MAX_GPUS_PER_JOB)
        return {count: streams.with_ack_wait(streams.runner_gpu(count), self._spec.ack_wait)
                for count in range(1, most + 1)}

    async def _claim_gpu_command(self, subscriptions: dict[int, Any]) -> tuple[Msg, list[str]] | None:
        """A GPU command this runner can start now, with the GPUs it takes; the biggest job that fits first."""
        for count in sorted(subscriptions, reverse=True):
            if count > self._gpu_pool.free:
                continue  # left in the stream, unclaimed, for a runner with that many free GPUs
            try:
                messages = await subscriptions[count].fetch(1, timeout=0.1)
            except (NatsTimeoutError, asyncio.TimeoutError):
                continue
            except Exception as error:  # broker away: the CPU fetch below reports it
                log.debug("gpu fetch failed: %s", error)
                return None
            if not messages:
                continue
            gpus = self._gpu_pool.take(count)
            if gpus is None:  # cannot happen while only this loop takes GPUs; hand it back at once
                with contextlib.suppress(Exception):
                    await messages[0].nak()
                continue
            await self._advertise()
            return messages[0], gpus
        return None

    async def _advertise(self) -> None:
        await advertise(self._bus, self._gpu_pool, runner_id=self._runner_id, slots=self._slot_count,
                        ship_held=self._ship_held, every=self._advertise_seconds)

    async def _keep_advertising(self, stop: asyncio.Event) -> None:
        """Renew the advertisement: a runner that stops renewing it (killed) stops counting as capacity."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._advertise_seconds):
                    await stop.wait()
            if not stop.is_set():
                await self._advertise()

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _acquire_slot(self, stop: asyncio.Event) -> bool:
        acquire = asyncio.create_task(self._slots.acquire())
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if acquire in done and not stop.is_set():
            return True
        if acquire in done:
            self._slots.release()
        else:
            acquire.cancel()
        return False

    async def hold(self, msg: Msg, *, gpus: list[str] | None = None) -> None:
        """Run one delivered command to its end and settle it; the GPUs it held go back to the pool.

        Timed as the consumer's handler call: a command is held while its job runs.
        """
        started = time.perf_counter()
        shipping = msg.subject in SHIP_SUBJECTS
        if shipping:
            self._ship_held += 1
            await self._advertise()
        try:
            # Continues the trace of the request that queued the command: the job's events carry it on.
            with tracing.span("runner hold command", headers=msg.headers, kind=SpanKind.CONSUMER, subject=msg.subject):
                await self._hold(msg, gpus=gpus)
        finally:
            metrics.HANDLER_SECONDS.labels(self._spec.durable).observe(time.perf_counter() - started)
            if shipping:
                self._ship_held -= 1
            if gpus:
                self._gpu_pool.give_back(gpus)
            if gpus or shipping:
                await self._advertise()

    async def _hold(self, msg: Msg, *, gpus: list[str] | None) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if msg.subject in SHIP_SUBJECTS and self._shipping is not None:
            # Export and inference share the consumer and its slots; their own handler runs them.
            await self._shipping.hold(msg, settle=self._settle)
            return
        try:
            cmd = StartTraining.model_validate_json(msg.data)
        except ValidationError as error:
            await self._settle(msg, PermanentError(f"not a StartTraining command: {error}"), delivered=delivered)
            return
        with job_context(job_id=cmd.job_id, attempt=cmd.attempt):
            await self._run_command(msg, cmd, delivered=delivered, gpus=gpus)

    async def _run_command(self, msg: Msg, cmd: StartTraining, *, delivered: int, gpus: list[str] | None) -> None:
        heartbeat = asyncio.create_task(self._keep_alive(msg, cmd.job_id))
        error: BaseException | None = None
        outcome = AttemptOutcome.REQUEUE
        try:
            outcome = await self._attempts.run(
                cmd, delivered=delivered, final_delivery=delivered >= self._spec.max_deliver, gpus=gpus
            )
        except Exception as failure:
            error = failure
            log.warning("attempt failed before it finished: %s", failure, extra={"job_id": cmd.job_id, "delivery": delivered})
        finally:
            heartbeat.cancel()
        if error is not None:
            await self._settle(msg, error, delivered=delivered)
        elif outcome is AttemptOutcome.FINISHED:
            await self._settle(msg, None, delivered=delivered)
        else:
            # Handed back without a terminal event: the next delivery is a new attempt that resumes.
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _keep_alive(self, msg: Msg, job_id: str) -> None:
        """`in_progress` every heartbeat; a runner cut off longer than the ack wait stops its trainer."""
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                await msg.in_progress()
                last_ok = time.monotonic()
            except Exception as error:
                log.warning("heartbeat failed: %s", error, extra={"job_id": job_id})
                if time.monotonic() - last_ok > self._spec.ack_wait:
                    # JetStream has handed the job to another runner by now; two trainers must not race.
                    self._attempts.held.request_stop(job_id, StopReason.BROKER_LOST)

    async def _settle(self, msg: Msg, error: BaseException | None, *, delivered: int) -> None:
        decision = decide_ack(error, delivered=delivered, spec=self._spec)
        if error is not None:
            metrics.HANDLER_FAILURES.labels(self._spec.durable, decision.action.value).inc()
        try:
            if decision.dead_letter:
                await self._bus.dead_letter(msg, consumer=self._spec.durable, reason=str(error))
            if decision.action is AckAction.ACK:
                await msg.ack()
            elif decision.action is AckAction.TERM:
                await msg.term()
            else:
                await msg.nak(delay=decision.delay)
        except Exception as settle_error:  # the broker redelivers after ack_wait
            log.warning("could not settle command: %s", settle_error)
