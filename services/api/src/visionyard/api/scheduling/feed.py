"""Where waiting jobs stand, pushed to WebSocket clients: one `sched_status` watch per API instance.

The scheduler rewrites a shard of positions (`jobs.<n>`) when something in it changed, at most a few
times a second. This instance follows those entries once, whatever the number of clients, and hands each
client watching a waiting job a `queue_position` message whenever that job's entry changes (and the
current one when it subscribes). A job that leaves the queue drops out of its shard and gets no more:
its `training_status_change` to `running` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from visionyard.api.adapters.scheduling_kv import watch_position_shards
from visionyard.shared.bus import Bus
from visionyard.shared.scheduling import JobPosition, PositionShard, position_shard, priority_name
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.api.scheduling.feed")

Offer = Callable[[dict[str, Any]], None]


def position_message(job_id: str, position: JobPosition, *, updated_at: float) -> dict[str, Any]:
    """The WebSocket message of one job's place in the queue."""
    estimate = position.estimated_start_seconds
    return {
        "type": "queue_position",
        "job_id": int(job_id) if job_id.isdigit() else job_id,
        "position": position.position,
        "jobs_ahead": position.jobs_ahead,
        "reason": position.reason,
        "detail": position.detail,
        "queue": position.queue,
        "priority": position.priority,
        "priority_name": priority_name(position.priority),
        "estimated_start_seconds": estimate,
        "estimated_start_at": datetime.fromtimestamp(updated_at + estimate, UTC).isoformat() if estimate is not None else None,
        "timestamp": datetime.fromtimestamp(updated_at, UTC).isoformat(),
    }


class QueuePositionsFeed:
    """Follows the position shards and tells each watching client about its jobs."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._shards: dict[str, PositionShard] = {}
        self._followers: dict[str, list[Offer]] = {}
        self._sent: dict[tuple[str, int], JobPosition] = {}
        self._task: asyncio.Task[None] | None = None

    def follow(self, job_id: str, offer: Offer) -> None:
        """Send `offer` the job's position now (if it waits) and whenever it changes."""
        self._followers.setdefault(job_id, []).append(offer)
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="queue-positions")
        shard = self._shards.get(position_shard(job_id))
        if shard is not None and job_id in shard.jobs:
            self._send(job_id, offer, shard.jobs[job_id], updated_at=shard.updated_at)

    def unfollow(self, job_id: str, offer: Offer) -> None:
        """Stop telling `offer` about the job."""
        offers = self._followers.get(job_id, [])
        with contextlib.suppress(ValueError):
            offers.remove(offer)
        self._sent.pop((job_id, id(offer)), None)
        if not offers:
            self._followers.pop(job_id, None)

    def _send(self, job_id: str, offer: Offer, position: JobPosition, *, updated_at: float) -> None:
        key = (job_id, id(offer))
        if self._sent.get(key) == position:
            return
        self._sent[key] = position
        offer(position_message(job_id, position, updated_at=updated_at))

    async def _watch(self) -> None:
        while True:
            updates = watch_position_shards(self._bus)
            try:
                async for key, shard in updates:
                    self._on_shard(key, shard)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("queue positions watch failed, watching again: %s", error)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await updates.aclose()

    def _on_shard(self, key: str, shard: PositionShard) -> None:
        self._shards[key] = shard
        for job_id, position in shard.jobs.items():
            for offer in list(self._followers.get(job_id, [])):
                self._send(job_id, offer, position, updated_at=shard.updated_at)

    async def close(self) -> None:
        """Stop following."""
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None
