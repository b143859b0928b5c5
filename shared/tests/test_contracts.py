"""Contracts: subjects, decoding, validation bounds, and the generated AsyncAPI document."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from visionyard.shared import subjects
from visionyard.shared.asyncapi import asyncapi_document
from visionyard.shared.commands import TrainingConfig
from visionyard.shared.events import JOB_EVENT_TYPES, JobFailed, ProgressReported, decode_job_event


def test_every_job_event_round_trips_through_its_subject() -> None:
    event = ProgressReported(job_id="abc", attempt=2, seq=7, epoch=3, total_epochs=5, metrics={"loss": 0.1})
    assert event.subject() == "evt.job.abc.progress"
    decoded = decode_job_event(event.subject(), event.to_bytes())
    assert decoded == event


def test_unknown_event_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown job event kind"):
        decode_job_event(subjects.job_event("abc", "exploded"), b"{}")


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("epochs", 1001), ("batch_size", 513), ("learning_rate", 0), ("learning_rate", 1.0)],
)
def test_training_config_bounds_name_the_field(field: str, value: float) -> None:
    config = {"framework": "pytorch", "model_name": "simple_cnn", "task_type": "image_classification", "dataset_id": "d"}
    with pytest.raises(ValidationError) as error:
        TrainingConfig.model_validate({**config, field: value})
    assert field in str(error.value)


def test_asyncapi_document_lists_every_event() -> None:
    document = asyncapi_document()
    addresses = {channel["address"] for channel in document["channels"].values()}
    for kind in JOB_EVENT_TYPES:
        assert f"evt.job.{{job_id}}.{kind}" in addresses
    assert "cmd.train" in addresses and "cmd.export" in addresses and "cmd.infer" in addresses
    assert "evt.export.{export_id}.completed" in addresses and "evt.infer.{infer_id}.cancelled" in addresses
    assert "reason" in document["components"]["schemas"][JobFailed.__name__]["properties"]


def test_asyncapi_documents_the_gpu_training_subjects() -> None:
    from visionyard.shared.asyncapi import asyncapi_document
    from visionyard.shared.devices import device_request

    (channel,) = [c for c in asyncapi_document()["channels"].values() if c["address"] == "cmd.train.gpu.{gpu_count}"]
    assert device_request({"device": "gpu", "gpu_count": 3}).subject == channel["address"].replace("{gpu_count}", "3")
