"""WebSocket clients as a user's browser would be: subscribe to a job, timestamp every message received.

In batched mode (`batch_ms`) each frame is a JSON array of messages, parsed with one `orjson.loads`; every
message in it is timestamped with the frame's arrival. The clients parse with orjson, not the stdlib: at
100 clients × 1,000 events/s, `json.loads` was 71 % of the bench process's CPU (py-spy), a core taken from
the stack being measured on the same two cores.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
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
                    measure_latency: bool = False, timeout: float = 600.0, batch_ms: int | None = None) -> Received:
    """Subscribe to `job_id` and count `training_progress` messages until `expected` arrived."""
    url = api_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={job_id}"
    if batch_ms is not None:
        url += f"&batch_ms={batch_ms}"
    async with connect(url, max_size=None, ping_interval=None, max_queue=None) as socket:
        if ready is not None:
            ready.set()
        # One deadline for the whole watch: a `wait_for` per message (a task each) cost the client more CPU
        # than the parsing at 200,000 messages/s, and the client must not be what limits the measurement.
        async with asyncio.timeout(timeout):
            while received.progress < expected:
                raw = await socket.recv(decode=False)
                now = time.time()
                if batch_ms is not None:
                    _take_frame(orjson.loads(raw), now=now, received=received)
                    continue
                # Only progress messages are parsed, for the same reason.
                if b'"training_progress"' not in raw:
                    continue
                received.progress += 1
                if received.first == 0.0:
                    received.first = now
                received.last = now
                if measure_latency:
                    received.latencies.append(now - orjson.loads(raw)["metrics"]["t_emit"])
    return received


def _take_frame(frame: list[dict] | dict, *, now: float, received: Received) -> None:
    if isinstance(frame, dict):
        return  # connected, subscribed: not part of the job's stream
    for message in frame:
        if message["type"] != "training_progress":
            continue
        # The synthetic trainer counts epochs 1, 2, ...: a batch that lost, repeated or reordered one shows here.
        if message["current_epoch"] != received.progress + 1:
            raise RuntimeError(f"epoch {message['current_epoch']} after {received.progress}")
        received.progress += 1
        if received.first == 0.0:
            received.first = now
        received.last = now
        received.latencies.append(now - message["metrics"]["t_emit"])
