"""The API's `/metrics`: jobs by state, WebSocket clients, and the process-wide consumer backlog."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from visionyard.shared.bus import Bus

from .test_api import JOBS, _job_body, _ready_dataset


async def _samples(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await client.get("/metrics")).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_count_jobs_by_state_websocket_clients_and_the_projector_backlog(
    client: httpx.AsyncClient, bus: Bus,
) -> None:
    dataset_id = await _ready_dataset(client, bus)
    first = (await client.post(JOBS, json=_job_body(dataset_id))).json()["id"]
    await client.post(JOBS, json=_job_body(dataset_id))
    samples = await _samples(client)
    assert samples[("visionyard_api_jobs", (("status", "pending"),))] == 2
    await client.post(f"{JOBS}/{first}/start")
    samples = await _samples(client)
    assert samples[("visionyard_api_jobs", (("status", "pending"),))] == 1
    assert samples[("visionyard_api_jobs", (("status", "queued"),))] == 1
    assert samples[("visionyard_api_websocket_clients", ())] == 0
    assert samples[("visionyard_api_websocket_dropped_slow_clients_total", ())] == 0
    # The projector's consume loop is tracked: its backlog is JetStream's count for `api-projector`.
    assert ("visionyard_consumer_pending", (("consumer", "api-projector"),)) in samples
    assert samples[("visionyard_handler_seconds_count", (("consumer", "api-projector"),))] >= 1
