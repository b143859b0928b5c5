"""`watch` against a tiny fake WebSocket server that drops the connection once mid-training."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve

from visionyard.cli.watch import watch_job

JOB = 7  # job ids are integers on the wire
TOTAL = 5


def progress(epoch: int, seq: int) -> list[dict[str, Any]]:
    """What the API sends for one epoch: progress and metrics sharing the event's seq."""
    metrics = {"loss": 1.0 / epoch, "accuracy": 0.5 + epoch / 20}
    return [
        {"type": "training_progress", "job_id": JOB, "status": "running", "current_epoch": epoch,
         "total_epochs": TOTAL, "progress_percent": 100 * epoch / TOTAL, "metrics": metrics, "seq": seq},
        {"type": "training_metrics", "job_id": JOB, "epoch": epoch, "metrics": metrics, "seq": seq},
    ]


def job_stream(terminal: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's whole message history, seq 1..N, as the server would replay it."""
    messages: list[dict[str, Any]] = [
        {"type": "training_status_change", "job_id": JOB, "old_status": "queued", "new_status": "running", "seq": 1},
        {"type": "training_log", "job_id": JOB, "level": "INFO", "event_type": "log", "message": "loaded 1293 images",
         "seq": 2},
    ]
    for epoch in range(1, TOTAL + 1):
        messages += progress(epoch, seq=2 + epoch)
    messages.append({**terminal, "job_id": JOB, "seq": 3 + TOTAL})
    return messages


@dataclass
class FakeTrainingSocket:
    """Replays the job after `last_seq` (minus one seq, to provoke duplicates); drops the first socket."""

    stream: list[dict[str, Any]]
    drop_after_seq: int = 4
    connections: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, socket: ServerConnection) -> None:
        query = parse_qs(urlsplit(socket.request.path).query)
        record: dict[str, Any] = {"query": {key: values[0] for key, values in query.items()}}
        self.connections.append(record)
        await socket.send(json.dumps({"type": "connected"}))
        record["subscribe"] = json.loads(await socket.recv())
        await socket.send(json.dumps({"type": "subscribed", "job_id": JOB}))
        resume_after = int(record["query"].get("last_seq", 0))
        first = len(self.connections) == 1
        for message in self.stream:
            # Re-send the last seen seq too: the client must not print it twice.
            if message["seq"] < resume_after:
                continue
            if first and message["seq"] > self.drop_after_seq:
                socket.transport.abort()  # a dropped connection, not a clean close
                return
            await socket.send(json.dumps(message))
        await socket.wait_closed()


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, FakeTrainingSocket]]:
    fake = FakeTrainingSocket(stream=[])
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/api/v1/ws/training", fake


def printed_epochs(output: str) -> list[int]:
    return [int(match) for match in re.findall(r"^epoch\s+(\d+)/", output, flags=re.MULTILINE)]


async def test_reconnects_with_last_seq_and_prints_every_epoch_exactly_once(
    fake_server: tuple[str, FakeTrainingSocket],
) -> None:
    url, fake = fake_server
    fake.stream = job_stream({"type": "training_complete", "status": "completed", "total_epochs_completed": TOTAL,
                              "best_metrics": {"accuracy": 0.75}})
    out = io.StringIO()

    outcome = await watch_job(url, JOB, out=out, reconnect_delay=0.01)

    assert outcome.status == "completed" and outcome.succeeded
    assert outcome.reconnects == 1
    assert len(fake.connections) == 2
    assert fake.connections[0]["query"]["last_seq"] == "0"  # the whole history first
    # The subscribe message asks for the same position (without last_seq it would restart the feed live only).
    assert fake.connections[0]["subscribe"] == {"type": "subscribe", "job_id": JOB, "last_seq": 0}
    assert fake.connections[1]["query"] == {"job_id": str(JOB), "last_seq": str(fake.drop_after_seq)}
    assert fake.connections[1]["subscribe"] == {"type": "subscribe", "job_id": JOB, "last_seq": fake.drop_after_seq}
    text = out.getvalue()
    assert printed_epochs(text) == [1, 2, 3, 4, 5]
    assert text.count("loaded 1293 images") == 1
    assert "epoch 5/5 [########################] 100.0%" in text
    assert "accuracy=0.7500" in text
    assert "completed after 5 epochs" in text


@pytest.mark.parametrize(
    ("terminal", "expected"),
    [
        ({"type": "training_error", "status": "failed", "error_message": "trainer_crash: exit code 1"}, "failed"),
        ({"type": "training_error", "status": "cancelled", "error_message": "cancelled"}, "cancelled"),
    ],
)
async def test_failed_or_cancelled_job_ends_the_watch_unsuccessfully(
    fake_server: tuple[str, FakeTrainingSocket], terminal: dict[str, Any], expected: str,
) -> None:
    url, fake = fake_server
    fake.stream = job_stream(terminal)
    fake.drop_after_seq = 100  # no drop
    out = io.StringIO()

    # The id as `visionyard watch` gets it from argv: a string, matching the messages' integer.
    outcome = await watch_job(url, str(JOB), out=out, reconnect_delay=0.01)

    assert outcome.status == expected and not outcome.succeeded
    assert outcome.reconnects == 0
    assert terminal["error_message"] in out.getvalue()
