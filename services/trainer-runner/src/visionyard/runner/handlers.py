"""The `runner` consumer's FastStream subscriber: claim training, export and inference commands while a slot
is free, hold each unacknowledged while its job runs, settle it.

The subscriber (one, on the `runner` durable, with a handler per command kind chosen by subject) is fed by
`CommandConsumer`, which claims a command only when a slot (and for a GPU job, its GPUs) is free: a
runner must not pull a command it cannot start while another has room. FastStream validates each command
into its model; an invalid one is dead-lettered by the settling middleware.

Ack timing is the whole point of this module: a command is acked only after its terminal event is
stored, nak'ed (no terminal event) when the runner shuts down or loses the broker so another runner
resumes the job, nak'ed with backoff when it failed before it finished, and dead-lettered only when it
cannot be decoded (or has no deliveries left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from faststream.nats.annotations import NatsMessage
from opentelemetry.trace import SpanKind

from visionyard.runner.devices import GpuPool, advertise, withdraw
from visionyard.runner.export_inference import ExportInferenceRuns
from visionyard.runner.service import AttemptOutcome, StopReason, TrainingAttempts
from visionyard.shared import metrics, streams, subjects, tracing
from visionyard.shared.bus import Bus, PermanentError
from visionyard.shared.bus.broker import ServiceBroker, feed, held_commands
from visionyard.shared.bus.consume import Claimer
from visionyard.shared.bus.held import HeldMessage
from visionyard.shared.bus.settle import DeadLetter, Delivered, delivery_count
from visionyard.shared.commands import StartExport, StartInference, StartTraining
from visionyard.shared.devices import MAX_GPUS_PER_JOB
from visionyard.shared.logs import job_context

log = logging.getLogger("visionyard.runner.handlers")

EXPORT_INFERENCE_SUBJECTS = (subjects.CMD_EXPORT, subjects.CMD_INFER)


class CommandConsumer:
    """Pulls the `runner` consumer one command at a time, never holding more than `slots` jobs."""

    def __init__(
        self,
        bus: Bus,
        handlers: CommandHandlers,
        *,
        slots: int,
        spec: streams.ConsumerSpec = streams.RUNNER,
        gpu_pool: GpuPool | None = None,
        runner_id: str = "",
        advertise_seconds: float = 5.0,
    ) -> None:
        self._bus = bus
        self._handlers = handlers
        self._gpu_pool = gpu_pool or GpuPool(gpus=[])
        self._runner_id = runner_id
        self._slot_count = slots
        self._slots = asyncio.Semaphore(slots)
        self._spec = spec
        self._tasks: set[asyncio.Task[None]] = set()
        self._advertise_seconds = advertise_seconds
        # Export and inference commands are not scheduled (they share this consumer and its slots directly):
        # the advertisement says how many slots they hold, so the scheduler does not count those as free.
        self._export_inference_held = 0
        self._subscriber: Any = None

    async def run(self, bus: Bus, subscriber: Any, stop: asyncio.Event) -> None:
        """Claim commands and hand each to `subscriber` until `stop`; then stop held trainers and hand their
        commands back (a `Feeder` of the broker: started and stopped with it)."""
        self._subscriber = subscriber
        subscription = await bus.claimer(self._spec)
        gpu_subscriptions = {count: await bus.claimer(spec) for count, spec in self._gpu_specs().items()}
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
                    gpu_msg, gpus = claimed
                    task = asyncio.create_task(self.hold(gpu_msg, gpus=gpus))
                    self._tasks.add(task)
                    task.add_done_callback(self._job_done)
                    continue
                try:
                    # With GPU consumers to poll too, a CPU fetch must not keep them waiting long.
                    msg = await subscription.claim(timeout=0.5 if gpu_subscriptions else 1.0)
                except Exception as error:  # broker away: keep trying, never exit
                    self._slots.release()
                    log.warning("fetch failed: %s", error)
                    await asyncio.sleep(0.5)
                    continue
                if msg is None:
                    self._slots.release()
                    continue
                if stop.is_set():  # claimed as the runner stopped: another runner takes it now
                    self._slots.release()
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    break
                task = asyncio.create_task(self.hold(msg))
                self._tasks.add(task)
                task.add_done_callback(self._job_done)
        finally:
            renewing.cancel()
            for spec in tracked:
                metrics.CONSUMERS.untrack(self._bus, spec)
            self._handlers.attempts.held.stop_all(StopReason.SHUTDOWN)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await subscription.close()
            for gpu_subscription in gpu_subscriptions.values():
                await gpu_subscription.close()
            await withdraw(self._bus, runner_id=self._runner_id)

    def _gpu_specs(self) -> dict[int, streams.ConsumerSpec]:
        """The GPU consumers this runner serves: one per job size it can ever hold (devices.py)."""
        most = min(self._gpu_pool.total, MAX_GPUS_PER_JOB)
        return {count: streams.with_ack_wait(streams.runner_gpu(count), self._spec.ack_wait)
                for count in range(1, most + 1)}

    async def _claim_gpu_command(self, subscriptions: dict[int, Claimer]) -> tuple[Delivered, list[str]] | None:
        """A GPU command this runner can start now, with the GPUs it takes; the biggest job that fits first."""
        for count in sorted(subscriptions, reverse=True):
            if count > self._gpu_pool.free:
                continue  # left in the stream, unclaimed, for a runner with that many free GPUs
            try:
                msg = await subscriptions[count].claim(timeout=0.1)
            except Exception as error:  # broker away: the CPU fetch below reports it
                log.debug("gpu fetch failed: %s", error)
                return None
            if msg is None:
                continue
            gpus = self._gpu_pool.take(count)
            if gpus is None:  # cannot happen while only this loop takes GPUs; hand it back at once
                with contextlib.suppress(Exception):
                    await msg.nak()
                continue
            await self._advertise()
            return msg, gpus
        return None

    async def _advertise(self) -> None:
        await advertise(self._bus, self._gpu_pool, runner_id=self._runner_id, slots=self._slot_count,
                        export_inference_held=self._export_inference_held, every=self._advertise_seconds)

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

    async def hold(self, msg: Any, *, gpus: list[str] | None = None) -> None:
        """Run one delivered command to its end and settle it; the GPUs it held go back to the pool.

        Timed as the consumer's handler call: a command is held while its job runs.
        """
        started = time.perf_counter()
        export_inference = msg.subject in EXPORT_INFERENCE_SUBJECTS
        if export_inference:
            self._export_inference_held += 1
            await self._advertise()
        try:
            # Continues the trace of the request that queued the command: the job's events carry it on.
            with tracing.span("runner hold command", headers=msg.headers, kind=SpanKind.CONSUMER, subject=msg.subject):
                if gpus:
                    self._handlers.claimed_gpus[msg.reply] = gpus
                await self._subscriber.consume(msg)
        finally:
            self._handlers.claimed_gpus.pop(msg.reply, None)
            metrics.HANDLER_SECONDS.labels(self._spec.durable).observe(time.perf_counter() - started)
            if export_inference:
                self._export_inference_held -= 1
            if gpus:
                self._gpu_pool.give_back(gpus)
            if gpus or export_inference:
                await self._advertise()


class CommandHandlers:
    """One delivered command each: decode it, hold it, run its use case, settle it.

    Holding is `HeldMessage` for all three kinds: heartbeats, the broker-lost stop (the job is stopped
    as at shutdown, without a terminal event: JetStream has handed its command to another runner by
    then) and settling through `decide_ack`.
    """

    def __init__(
        self,
        attempts: TrainingAttempts,
        runs: ExportInferenceRuns | None,
        *,
        spec: streams.ConsumerSpec,
        heartbeat_seconds: float,
        dead_letter: DeadLetter | None,
    ) -> None:
        self.attempts = attempts
        self.runs = runs
        # The GPUs the consumer took for a claimed command, by its delivery (reply subject).
        self.claimed_gpus: dict[str, list[str]] = {}
        self._spec = spec
        self._heartbeat = heartbeat_seconds
        self._dead_letter = dead_letter

    async def on_train(self, cmd: StartTraining, message: NatsMessage) -> None:
        """`cmd.train` (and the admitted and GPU subjects): run one training attempt on the GPUs the
        consumer took for it (none: the CPU)."""
        msg: Delivered = message.raw_message
        gpus = self.claimed_gpus.get(message.raw_message.reply)
        with job_context(job_id=cmd.job_id, attempt=cmd.attempt):
            async with self._hold(msg, cmd.job_id) as held:
                work = self.attempts.run(cmd, delivered=held.delivered, final_delivery=held.final_delivery, gpus=gpus)
                await _run_and_settle(held, work, job_id=cmd.job_id)

    async def on_export(self, cmd: StartExport, message: NatsMessage) -> None:
        """`cmd.export`: export a stored checkpoint."""
        msg: Delivered = message.raw_message
        if self.runs is None:
            await self._reject(msg, "this runner runs no exports")
            return
        async with self._hold(msg, cmd.job_id) as held:
            await _run_and_settle(held, self.runs.run_export(cmd, delivered=held.delivered), job_id=cmd.job_id)

    async def on_infer(self, cmd: StartInference, message: NatsMessage) -> None:
        """`cmd.infer`: classify images with a stored checkpoint."""
        msg: Delivered = message.raw_message
        if self.runs is None:
            await self._reject(msg, "this runner runs no inference")
            return
        async with self._hold(msg, cmd.job_id) as held:
            await _run_and_settle(held, self.runs.run_inference(cmd, delivered=held.delivered), job_id=cmd.job_id)

    def _hold(self, msg: Delivered, job_id: str) -> HeldMessage:
        # Export and inference runs are in the same HeldJobs as training attempts.
        return HeldMessage(
            msg, spec=self._spec, heartbeat_seconds=self._heartbeat, dead_letter=self._dead_letter,
            # This delivery only: by the time it is lost, a redelivery of the job may be held here too.
            on_lost=lambda: self.attempts.held.request_stop(job_id, StopReason.BROKER_LOST,
                                                            delivered=delivery_count(msg)),
        )

    async def _reject(self, msg: Delivered, reason: str) -> None:
        await self._hold(msg, "").settle(PermanentError(reason))


async def _run_and_settle(held: HeldMessage, work: Awaitable[AttemptOutcome], *, job_id: str) -> None:
    """Ack once the terminal event is stored, hand back a job stopped without one, nak a failure with backoff.

    A delivery that is no longer ours (its broker was lost, or its command redelivered) is left to JetStream's
    redelivery, failed or not: a nak of a stale delivery delivers the command once more beside that redelivery.
    """
    failure: Exception | None = None
    try:
        outcome = await work
    except Exception as caught:
        log.warning("attempt failed before it finished: %s", caught, extra={"job_id": job_id, "delivery": held.delivered})
        failure, outcome = caught, AttemptOutcome.REQUEUE
    if outcome is AttemptOutcome.FINISHED:
        await held.settle(None)
    elif outcome is AttemptOutcome.LEFT or held.lost.is_set():
        log.info("left a lost delivery to JetStream's redelivery", extra={"job_id": job_id, "delivery": held.delivered})
        await held.leave()
    elif failure is not None:
        await held.settle(failure)
    else:
        # Handed back without a terminal event: the next delivery is a new attempt that resumes.
        await held.hand_back()


def subscribe(broker: ServiceBroker, handlers: CommandHandlers, consumer: CommandConsumer,
              spec: streams.ConsumerSpec) -> None:
    """Declare the runner's subscriber on `broker`, fed by `consumer`'s claims."""
    subscriber = held_commands(broker, spec, description="Training, export and inference commands, held while "
                                                         "their jobs run")
    subscriber(filter=lambda message: message.raw_message.subject == subjects.CMD_EXPORT)(handlers.on_export)
    subscriber(filter=lambda message: message.raw_message.subject == subjects.CMD_INFER)(handlers.on_infer)
    subscriber(handlers.on_train)
    feed(broker, subscriber, consumer.run)
