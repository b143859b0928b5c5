"""Live feeds: event → WebSocket message translation, replay/resume from the real EVENTS stream, and the
WebSocket endpoint's batched mode."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from visionyard.api.config import ApiSettings
from visionyard.api.live.feed import JobFeed, JobView, translate
from visionyard.api.main import create_app
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import (
    ArtifactStored,
    JobCompleted,
    JobQueued,
    JobStarted,
    JobTracked,
    LogEmitted,
    ProgressReported,
)
from visionyard.shared.natsserver import free_port

from ..conftest import CLASSIFIER, until
from ..export_inference_world import stream_messages, training_job


def _run(job_id: str = "j1", attempt: int = 1) -> list:
    return [
        JobQueued(job_id=job_id, attempt=attempt),
        JobStarted(job_id=job_id, attempt=attempt, seq=1, runner_id="r1"),
        ProgressReported(job_id=job_id, attempt=attempt, seq=2, epoch=1, total_epochs=2, metrics={"accuracy": 0.5}),
        LogEmitted(job_id=job_id, attempt=attempt, seq=3, message="hello", event_type="stdout"),
        ArtifactStored(job_id=job_id, attempt=attempt, seq=4, checkpoint_kind="best", uri="file:///b.pt",
                       sha256="0" * 64, size_bytes=3),
        ProgressReported(job_id=job_id, attempt=attempt, seq=5, epoch=2, total_epochs=2, metrics={"accuracy": 0.9}),
        JobTracked(job_id=job_id, attempt=attempt, run_id="run-1", experiment_id="1"),
        JobCompleted(job_id=job_id, attempt=attempt, seq=6, total_epochs_completed=2,
                     final_metrics={"accuracy": 0.9}, best_metrics={"accuracy": 0.9}, best_epoch=2),
    ]


def test_translation_reports_status_changes_progress_and_completion() -> None:
    view = JobView(job_id="j1")
    messages = [m for seq, event in enumerate(_run(), start=1) for m in translate(event, seq=seq, view=view)]
    types = [m["type"] for m in messages]
    changes = [(m["old_status"], m["new_status"]) for m in messages if m["type"] == "training_status_change"]
    assert changes == [("pending", "queued"), ("queued", "running"), ("running", "completed")]
    assert types.count("training_progress") == 2 and types.count("training_metrics") == 2
    assert "training_log" in types
    complete = next(m for m in messages if m["type"] == "training_complete")
    assert complete["best_checkpoint_path"] == "file:///b.pt"
    assert complete["mlflow_run_id"] == "run-1"
    second_progress = [m for m in messages if m["type"] == "training_progress"][1]
    assert second_progress["progress_percent"] == 100.0
    assert second_progress["best_checkpoint_path"] == "file:///b.pt"
    assert all("seq" in m for m in messages)


def test_events_of_a_superseded_attempt_are_not_shown() -> None:
    view = JobView(job_id="j1")
    translate(JobStarted(job_id="j1", attempt=2, seq=1, runner_id="r2"), seq=1, view=view)
    stale = ProgressReported(job_id="j1", attempt=1, seq=9, epoch=3, total_epochs=5)
    assert translate(stale, seq=2, view=view) == []


@pytest.mark.integration
async def test_feed_replays_then_streams_live_and_resumes_after_last_seq(bus: Bus) -> None:
    events = _run("jobfeed")
    for event in events[:4]:
        await bus.publish(event)
    received: list[dict] = []

    async def collect(message: dict) -> None:
        received.append(message)

    feed = JobFeed(bus=bus, job_id="jobfeed", last_seq=None, send=collect)
    await feed.start()
    for event in events[4:]:
        await bus.publish(event)
    await _until(lambda: any(m["type"] == "training_complete" for m in received))
    await feed.stop()
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(seqs)
    # Reconnect after the first progress message: only what came later, nothing twice, nothing lost.
    cut = next(m["seq"] for m in received if m["type"] == "training_progress")
    resumed: list[dict] = []

    async def collect_resumed(message: dict) -> None:
        resumed.append(message)

    again = JobFeed(bus=bus, job_id="jobfeed", last_seq=cut, send=collect_resumed)
    await again.start()
    await _until(lambda: any(m["type"] == "training_complete" for m in resumed))
    await again.stop()
    assert resumed == [m for m in received if m["seq"] > cut]
    # The rebuilt view still knows the old status at the resume point.
    assert [m for m in resumed if m["type"] == "training_status_change"][-1]["old_status"] == "running"


async def _until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_a_retry_is_shown_as_retrying_then_running_again() -> None:
    view = JobView(job_id="j1")
    translate(JobStarted(job_id="j1", attempt=1, seq=1, runner_id="r1"), seq=1, view=view)
    retry = translate(JobQueued(job_id="j1", attempt=2, status="retrying"), seq=2, view=view)
    assert [(m["old_status"], m["new_status"]) for m in retry] == [("running", "retrying")]
    again = translate(JobStarted(job_id="j1", attempt=2, seq=1, runner_id="r2"), seq=3, view=view)
    assert [(m["old_status"], m["new_status"]) for m in again] == [("retrying", "running")]


@pytest.fixture
async def served(bus: Bus, settings: ApiSettings) -> AsyncIterator[str]:
    """The base URL of an API served by uvicorn on a free loopback port (as in production)."""
    kv = await bus.kv(streams.KV_CAPABILITIES)
    await kv.put(CLASSIFIER.name, CLASSIFIER.model_dump_json().encode())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, bus=bus), host="127.0.0.1", port=port,
                                           log_level="warning", ws_per_message_deflate=False))
    serving = asyncio.create_task(server.serve())
    await _until(lambda: server.started or serving.done())
    assert server.started
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    await serving


@pytest.fixture
def ws_url(served: str) -> str:
    """The WebSocket endpoint of the served API."""
    return f"ws://{served}/api/v1/ws/training"


async def _job_with_a_run(served: str, bus: Bus) -> int:
    """A job the caller may watch (its row decides access), started, with a whole run in EVENTS; its integer id.

    The API itself publishes the `queued` event when the job starts; the rest of the run follows it. Returns
    once the job's row shows `completed`, so terminal messages are not held back for the projection.
    """
    async with httpx.AsyncClient(base_url=f"http://{served}") as http:
        job_id = await training_job(http, bus, start=True)

        async def queued() -> list[tuple[str, bytes]]:
            return await stream_messages(bus, "EVENTS", subjects.job_event(str(job_id), "queued"))

        await until(queued)
        for event in _run(str(job_id))[1:]:
            await bus.publish(event)

        async def completed() -> bool:
            return (await http.get(f"/api/v1/training/jobs/{job_id}")).json()["status"] == "completed"

        await until(completed)
    return job_id


async def _next(socket: ClientConnection) -> Any:
    return json.loads(await asyncio.wait_for(socket.recv(), timeout=10))


async def _watch(url: str) -> tuple[list[Any], list[dict]]:
    """Every frame the endpoint sent until `training_complete`, and the job's messages flattened."""
    frames: list[Any] = []
    messages: list[dict] = []
    async with connect(url) as socket:
        while not any(m["type"] == "training_complete" for m in messages):
            frame = await _next(socket)
            frames.append(frame)
            if isinstance(frame, list):
                messages.extend(frame)
            elif "seq" in frame:
                messages.append(frame)
    return frames, messages


@pytest.mark.integration
async def test_batched_websocket_frames_carry_the_per_message_stream_and_resume_after_last_seq(
    bus: Bus, served: str, ws_url: str
) -> None:
    job_id = await _job_with_a_run(served, bus)
    # last_seq=0: the whole history, then live (without last_seq a socket gets live messages only).
    single_frames, single = await _watch(f"{ws_url}?job_id={job_id}&last_seq=0")
    frames, batched = await _watch(f"{ws_url}?job_id={job_id}&batch_ms=20&last_seq=0")
    assert all(isinstance(frame, dict) for frame in single_frames)  # the default contract is unchanged
    assert [f["type"] for f in frames[:2]] == ["connected", "subscribed"] and frames[1]["batch_ms"] == 20
    assert all(isinstance(frame, list) and frame for frame in frames[2:])
    assert batched == single
    assert {m["job_id"] for m in single} == {job_id}  # the integer id in every message
    assert [m["new_status"] for m in single if m["type"] == "training_status_change"] == [
        "queued", "running", "completed"]
    cut = next(m["seq"] for m in single if m["type"] == "training_progress")
    _, resumed = await _watch(f"{ws_url}?job_id={job_id}&batch_ms=20&last_seq={cut}")
    assert resumed == [m for m in single if m["seq"] > cut]
    # The same through a subscribe message on an open connection.
    async with connect(ws_url) as socket:
        assert (await _next(socket))["type"] == "connected"
        await socket.send(json.dumps({"type": "subscribe", "job_id": job_id, "last_seq": cut, "batch_ms": 5}))
        subscribed = await _next(socket)
        assert subscribed["type"] == "subscribed" and subscribed["batch_ms"] == 5
        got: list[dict] = []
        while not any(m["type"] == "training_complete" for m in got):
            frame = await _next(socket)
            assert isinstance(frame, list)
            got.extend(frame)
        assert got == resumed
    # Without last_seq: live messages only. The subscription starts after the whole finished run.
    async with connect(f"{ws_url}?job_id={job_id}") as socket:
        assert (await _next(socket))["type"] == "connected"
        subscribed = await _next(socket)
        assert subscribed["type"] == "subscribed" and subscribed["job_id"] == job_id
        assert subscribed["last_seq"] >= single[-1]["seq"]
        await socket.send(json.dumps({"type": "ping"}))
        assert (await _next(socket))["type"] == "pong"


@pytest.mark.integration
async def test_a_bad_batch_ms_gets_an_error_naming_the_field_and_subscribes_nothing(
    bus: Bus, served: str, ws_url: str
) -> None:
    job_id = await _job_with_a_run(served, bus)
    async with connect(f"{ws_url}?job_id={job_id}&batch_ms=fast&last_seq=0") as socket:
        assert (await _next(socket))["type"] == "connected"
        error = await _next(socket)
        assert error["type"] == "error" and "batch_ms" in error["message"] and "'fast'" in error["message"]
        for bad in (-1, "soon", 2.5, True):
            await socket.send(json.dumps({"type": "subscribe", "job_id": job_id, "last_seq": 0, "batch_ms": bad}))
            error = await _next(socket)
            assert error["type"] == "error" and "batch_ms" in error["message"]
        await socket.send(json.dumps({"type": "ping"}))
        # One writer per connection: had anything been subscribed, its messages would come before the pong.
        assert (await _next(socket))["type"] == "pong"
        # Out of range is clamped, not refused; null asks for one message per frame.
        await socket.send(json.dumps({"type": "subscribe", "job_id": job_id, "last_seq": 0, "batch_ms": 60_000}))
        assert (await _next(socket))["batch_ms"] == 1000
        # The catch-up comes in frames (the terminal message may wait for the projection gate in its own frame).
        catch_up: list[dict] = []
        while not catch_up or catch_up[-1]["type"] != "training_complete":
            frame = await _next(socket)
            assert isinstance(frame, list) and frame
            catch_up.extend(frame)
        await socket.send(json.dumps({"type": "subscribe", "job_id": job_id, "last_seq": 0, "batch_ms": None}))
        subscribed = await _next(socket)
        assert subscribed["type"] == "subscribed" and "batch_ms" not in subscribed
        singles = [await _next(socket) for _ in catch_up]
        assert singles == catch_up  # one message per frame again, the same messages


@pytest.mark.integration
async def test_a_status_change_waits_for_the_projection_gate(bus: Bus) -> None:
    """Each status change, and `training_complete` (and what follows it), is held until the gate says the job's
    row shows that status."""
    for event in _run("gated"):
        await bus.publish(event)
    received: list[dict] = []
    gate_called = asyncio.Event()
    projected = asyncio.Event()
    asked: list[tuple[str, int, str]] = []

    async def collect(message: dict) -> None:
        received.append(message)

    async def gate(job_id: str, attempt: int, status: str) -> None:
        asked.append((job_id, attempt, status))
        if status != "completed":
            return
        gate_called.set()
        await projected.wait()

    feed = JobFeed(bus=bus, job_id="gated", last_seq=None, send=collect, gate=gate)
    await feed.start()
    try:
        await asyncio.wait_for(gate_called.wait(), timeout=20)
        assert "training_progress" in [m["type"] for m in received]
        assert not any(m["type"] in ("training_complete",) or m.get("new_status") == "completed" for m in received)
        projected.set()
        await until(lambda: _has(received, "training_complete"))
        assert [m["job_id"] for m in received if m["type"] == "training_complete"] == ["gated"]
        assert [status for _, _, status in asked] == ["queued", "running", "completed"]
    finally:
        await feed.stop()


async def _has(received: list[dict], kind: str) -> bool:
    return any(message["type"] == kind for message in received)
