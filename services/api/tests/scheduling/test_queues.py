"""The queue through REST and the WebSocket, with the app's own scheduler on a real nats-server: priorities
on create and by PATCH, positions and reasons on `GET /training/jobs/{id}`, `GET /queues`, project weights
and quotas, and `queue_position` messages. The runner is an advertisement in `runner_devices` (no process):
what is admitted is read from the COMMANDS stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from visionyard.api.config import ApiSettings
from visionyard.cli.client import ApiClient
from visionyard.cli.queues import show_job, show_queues
from visionyard.shared import streams
from visionyard.shared.bus import Bus

from ..access_world import served
from ..conftest import CLASSIFIER, until
from ..test_api import _job_body, _ready_dataset

pytestmark = pytest.mark.integration

JOBS = "/api/v1/training/jobs"


async def advertise_runner(bus: Bus, *, slots: int) -> None:
    """A runner with `slots` slots and no GPU, as its advertisement says."""
    devices = await bus.kv(streams.KV_RUNNER_DEVICES)
    await devices.put("r1", json.dumps({"runner_id": "r1", "slots": slots, "gpus": [], "free_gpus": [], "export_inference_held": 0,
                                        "advertise_seconds": 60, "updated_at": time.time()}).encode())


async def queued_job(client: httpx.AsyncClient, dataset_id: str, **fields: Any) -> int:
    created = await client.post(JOBS, json={**_job_body(dataset_id), **fields})
    assert created.status_code == 201, created.text
    job_id: int = created.json()["id"]
    assert (await client.post(f"{JOBS}/{job_id}/start")).status_code == 200
    return job_id


async def queue_of(client: httpx.AsyncClient, job_id: int, **expected: Any) -> dict[str, Any]:
    """The job's `queue` once it shows every `expected` field (the scheduler reports a moment later)."""

    async def shown() -> dict[str, Any] | None:
        queue = (await client.get(f"{JOBS}/{job_id}")).json()["queue"]
        return queue if queue and all(queue.get(key) == value for key, value in expected.items()) else None

    found: dict[str, Any] = await until(shown, timeout=30)
    return found


async def test_priorities_positions_reasons_and_queue_depths_through_rest(client: httpx.AsyncClient, bus: Bus) -> None:
    dataset_id = await _ready_dataset(client, bus)
    refused = await client.post(JOBS, json={**_job_body(dataset_id), "priority": "urgent"})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("priority"), refused.text
    created = (await client.post(JOBS, json={**_job_body(dataset_id), "priority": "high"})).json()
    assert (created["priority"], created["priority_name"], created["queue"]) == (100, "high", None)
    high = created["id"]
    assert (await client.post(f"{JOBS}/{high}/start")).status_code == 200
    first, second = [await queued_job(client, dataset_id) for _ in range(2)]
    low = await queued_job(client, dataset_id, priority="low")

    # No runner yet: every job waits, saying why.
    waiting = await queue_of(client, first, reason="no_runner")
    assert waiting["detail"] == "no runner is connected" and waiting["estimated_start_seconds"] is None

    await advertise_runner(bus, slots=1)
    # The one slot goes to the high-priority job although it is not the oldest.
    dispatched = await queue_of(client, high, reason="dispatching")
    assert dispatched["position"] == 0
    admitted = await bus.js.stream_info(streams.COMMANDS.name, subjects_filter="cmd.train.>")
    assert admitted.state.subjects == {f"cmd.train.job.{high}.1": 1}
    assert (await queue_of(client, first, position=1))["reason"] == "capacity"
    behind = await queue_of(client, second, position=2)
    assert (behind["reason"], behind["jobs_ahead"]) == ("priority", 1)
    assert (await queue_of(client, low, position=3))["reason"] == "priority"

    # A queued job's priority is a REST call; it moves ahead. An admitted one's no longer changes.
    bad = await client.patch(f"{JOBS}/{low}/priority", json={"priority": 5000})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("priority"), bad.text
    raised = await client.patch(f"{JOBS}/{low}/priority", json={"priority": "high"})
    assert raised.status_code == 200 and raised.json()["priority"] == 100, raised.text
    assert (await queue_of(client, low, position=1))["jobs_ahead"] == 0
    assert (await queue_of(client, first, position=2))["reason"] == "priority"
    late = await client.patch(f"{JOBS}/{high}/priority", json={"priority": "low"})
    assert late.status_code == 409 and "already handed to a runner" in late.json()["detail"], late.text

    queues = (await client.get("/api/v1/queues")).json()
    assert queues["stale"] is False and queues["capacity"]["slots"] == 1 and queues["capacity"]["free_slots"] == 0
    depth = (await client.get("/api/v1/queues/depth")).json()  # what KEDA scales runners on
    assert (depth["waiting"], depth["running"], depth["slots"], depth["stale"]) == (3, 1, 1, False)
    cpu = next(queue for queue in queues["queues"] if queue["queue"] == "cpu")
    assert (cpu["waiting"], cpu["running"]) == (3, 1)
    (project,) = cpu["projects"]
    assert project["by_priority"] == {"high": 1, "normal": 2} and project["project_name"] == "Uncategorized"


async def test_project_weights_and_quotas_are_set_by_rest_and_hold_jobs_back_with_the_reason(
    client: httpx.AsyncClient, bus: Bus
) -> None:
    dataset_id = await _ready_dataset(client, bus)
    project = (await client.post("/api/v1/projects", json={"name": "capped"})).json()["id"]
    path = f"/api/v1/projects/{project}/scheduling"
    assert (await client.get(path)).json() == {"project_id": project, "weight": 1, "max_running_jobs": None,
                                                "max_gpus": None}
    refused = await client.put(path, json={"weight": 0})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("weight"), refused.text
    updated = await client.put(path, json={"weight": 3, "max_running_jobs": 1})
    assert updated.status_code == 200 and updated.json()["max_running_jobs"] == 1, updated.text
    await advertise_runner(bus, slots=4)
    running = await queued_job(client, dataset_id, project_id=project)
    await queue_of(client, running, reason="dispatching")
    held = await queued_job(client, dataset_id, project_id=project, priority="high")
    other = await queued_job(client, dataset_id)  # another project: free slots are its to take
    await queue_of(client, other, reason="dispatching")
    blocked = await queue_of(client, held, reason="quota")
    assert blocked["detail"] == f"project {project} runs 1 of its 1 allowed job"
    queues = (await client.get("/api/v1/queues")).json()
    mine = next(p for queue in queues["queues"] for p in queue["projects"] if p["project_id"] == project)
    assert (mine["weight"], mine["max_running_jobs"], mine["waiting"], mine["running"]) == (3, 1, 1, 1)
    # Lifting the quota lets it go.
    assert (await client.put(path, json={"weight": 3, "max_running_jobs": None})).status_code == 200
    await queue_of(client, held, reason="dispatching")


async def test_the_websocket_tells_a_waiting_job_where_it_stands(bus: Bus, settings: ApiSettings) -> None:
    kv = await bus.kv(streams.KV_CAPABILITIES)
    await kv.put(CLASSIFIER.name, CLASSIFIER.model_dump_json().encode())
    async with served(settings, bus) as (_, base_url), httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        dataset_id = await _ready_dataset(client, bus)
        await advertise_runner(bus, slots=1)
        running = await queued_job(client, dataset_id)
        await queue_of(client, running, reason="dispatching")
        waiting = await queued_job(client, dataset_id)
        await queue_of(client, waiting, position=1)
        url = base_url.replace("http://", "ws://") + f"/api/v1/ws/training?job_id={waiting}"
        async with connect(url) as socket:

            async def next_position() -> dict[str, Any]:
                while True:
                    message = json.loads(await asyncio.wait_for(socket.recv(), timeout=30))
                    if isinstance(message, dict) and message.get("type") == "queue_position":
                        return message

            now = await next_position()
            assert (now["job_id"], now["position"], now["reason"], now["priority_name"]) == (waiting, 1, "capacity",
                                                                                              "normal")
            # Another job jumps the line: the waiting one hears it is second now.
            await queued_job(client, dataset_id, priority="high")
            moved = await next_position()
            while moved["position"] != 2:
                moved = await next_position()
            assert (moved["reason"], moved["jobs_ahead"]) == ("priority", 1)

        # `visionyard queue` prints the same, from the same routes.
        with ApiClient(base_url) as cli:
            table = await asyncio.to_thread(show_queues, cli)
            where = await asyncio.to_thread(show_job, cli, str(waiting))
        lines = table.splitlines()
        assert lines[0].startswith("scheduler api-") and "slots 0 free of 1" in lines[0]
        assert lines[1].split() == ["QUEUE", "PROJECT", "PRIORITY", "WAITING", "RUNNING", "WEIGHT", "QUOTA"]
        assert lines[2].split()[:6] == ["cpu", str(projects(lines)), "Uncategorized", "high", "1", "1"]
        assert lines[3].split() == ["normal", "1"]
        assert where.startswith(f"job {waiting} (normal priority) is queued: position 2 in cpu (1 ahead); waits on "
                                "priority")


def projects(lines: list[str]) -> int:
    """The project id in the first row of `visionyard queue`'s table."""
    return int(lines[2].split()[1])
