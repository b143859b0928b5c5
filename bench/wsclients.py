"""WebSocket clients as a user's browser would be: subscribe to a job, timestamp every message received."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from websockets.asyncio.client import connect


@dataclass
class Received:
    """What one client saw of its job: progress messages, arrival times and emit→receive latencies."""

    progress: int = 0
    first: float = 0.0
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)
    terminal: bool = False


async def watch_job(api_url: str, job_id: str, *, expected: int, received: Received, ready: asyncio.Event | None = None,
                    measure_latency: bool = False, timeout: float = 600.0) -> Received:
    """Subscribe to `job_id` and count `training_progress` messages until `expected` arrived."""
    url = api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={job_id}"
    async with connect(url, max_size=None, ping_interval=None, max_queue=None) as socket:
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + timeout
        while received.progress < expected:
            raw = await asyncio.wait_for(socket.recv(), timeout=max(1.0, deadline - time.monotonic()))
            now = time.time()
            # Only progress messages are parsed: the client must not be what limits the measurement.
            if '"training_progress"' not in raw:
                continue
            received.progress += 1
            if received.first == 0.0:
                received.first = now
            received.last = now
            if measure_latency:
                received.latencies.append(now - json.loads(raw)["metrics"]["t_emit"])
    return received
