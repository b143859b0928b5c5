"""`ensure_topology` brings an existing durable consumer's filter up to date (nats-server's create
request updates a consumer whose config changed), so a server that ran an older release gets the
runner's `cmd.export`/`cmd.infer` subjects without a manual migration."""

from __future__ import annotations

import pytest
from nats.js import api

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.commands import CheckpointRef, StartExport
from visionyard.shared.events import ExportCompleted, decode_export_inference_event
from visionyard.shared.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_runner_consumer_filter_is_updated_on_an_existing_server(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, service="test")
    try:
        await bus.js.add_stream(streams.stream_config(streams.COMMANDS, replicas=1))
        old = api.ConsumerConfig(durable_name="runner", ack_policy=api.AckPolicy.EXPLICIT,
                                 filter_subject=subjects.CMD_TRAIN)
        await bus.js.add_consumer(streams.COMMANDS.name, config=old)
        await bus.ensure_topology()
        info = await bus.js.consumer_info(streams.COMMANDS.name, "runner")
        assert set(info.config.filter_subjects or [info.config.filter_subject]) == {
            subjects.CMD_TRAIN, subjects.CMD_TRAIN_JOBS, subjects.CMD_EXPORT, subjects.CMD_INFER}
        command = StartExport(job_id="e1", attempt=1, training_job_id="t1", export_format="onnx",
                              checkpoint=CheckpointRef(kind="best", uri="file:///x", sha256="0" * 64),
                              framework="pytorch", model_name="simple_cnn", task_type="image_classification")
        await bus.publish(command)
        subscription = await bus.js.pull_subscribe_bind(durable="runner", stream=streams.COMMANDS.name)
        [msg] = await subscription.fetch(1, timeout=5)
        assert msg.subject == subjects.CMD_EXPORT
        assert StartExport.model_validate_json(msg.data).training_job_id == "t1"
    finally:
        await bus.close()


def test_export_inference_events_round_trip_by_subject() -> None:
    event = ExportCompleted(job_id="e1", attempt=2, seq=3, training_job_id="t1", results={"validation_passed": True})
    assert event.subject() == "evt.export.e1.completed"
    decoded = decode_export_inference_event(event.subject(), event.to_bytes())
    assert isinstance(decoded, ExportCompleted) and decoded.results == {"validation_passed": True}
    with pytest.raises(ValueError):
        decode_export_inference_event("evt.export.e1.exploded", event.to_bytes())
