"""Consumer side of `cmd.export` / `cmd.infer`: decode, hold with heartbeats, run, settle.

The `runner` consumer delivers these next to `cmd.train` (same slots); `TrainCommandConsumer` hands
them here by subject. A command is acked once its terminal event is stored; an undecodable one is
dead-lettered; a transient failure (storage unreachable) naks it with backoff; a job the runner
stopped without a terminal event (its shutdown) is nak'ed at once so another runner takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from pydantic import ValidationError

from visionyard.runner.service import AttemptOutcome
from visionyard.runner.shipping import ShippingRuns
from visionyard.shared import subjects
from visionyard.shared.bus import PermanentError
from visionyard.shared.commands import StartExport, StartInference

SHIP_SUBJECTS = (subjects.CMD_EXPORT, subjects.CMD_INFER)

Settle = Callable[..., Awaitable[None]]


class ShipCommandHandler:
    """Runs one delivered export/inference command and settles it through the consumer's `settle`."""

    def __init__(self, runs: ShippingRuns, *, heartbeat_seconds: float) -> None:
        self.runs = runs
        self._heartbeat = heartbeat_seconds

    async def hold(self, msg: Msg, *, settle: Settle) -> None:
        """Run the command to its terminal event, then settle it."""
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        try:
            if msg.subject == subjects.CMD_EXPORT:
                export = StartExport.model_validate_json(msg.data)
                work = self.runs.run_export(export, delivered=delivered)
            else:
                inference = StartInference.model_validate_json(msg.data)
                work = self.runs.run_inference(inference, delivered=delivered)
        except ValidationError as error:
            await settle(msg, PermanentError(f"not a {msg.subject} command: {error}"), delivered=delivered)
            return
        beat = asyncio.create_task(self._keep_alive(msg))
        error: BaseException | None = None
        outcome = AttemptOutcome.FINISHED
        try:
            outcome = await work
        except Exception as failure:
            error = failure
        finally:
            beat.cancel()
        if error is None and outcome is AttemptOutcome.REQUEUE:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        await settle(msg, error, delivered=delivered)

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            with contextlib.suppress(Exception):
                await msg.in_progress()
