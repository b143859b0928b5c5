"""The message envelope: the schema version on the wire, and refused for a major this code does not read."""

from __future__ import annotations

import json

import pytest

from visionyard.shared import subjects
from visionyard.shared.commands import IngestDataset
from visionyard.shared.events import (
    DatasetRejected,
    ExportCompleted,
    ProgressReported,
    decode_dataset_event,
    decode_export_inference_event,
    decode_job_event,
)
from visionyard.shared.messages import (
    SCHEMA_VERSION,
    SCHEMA_VERSION_HEADER,
    SchemaVersionError,
    check_schema_version,
)


def progress() -> ProgressReported:
    return ProgressReported(job_id="j1", attempt=1, seq=3, epoch=2, total_epochs=5, metrics={"loss": 0.5})


def rewritten(data: bytes, **changes: object) -> bytes:
    """`data` with fields set (or dropped, when the value is None)."""
    body = json.loads(data)
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return json.dumps(body).encode()


def test_every_message_carries_its_schema_version_on_the_wire() -> None:
    command = IngestDataset(dataset_id="d1", object_name="o", sha256="a" * 64, size_bytes=1, filename="d.zip")
    for message in (progress(), command, DatasetRejected(dataset_id="d1", reason="no images")):
        assert json.loads(message.to_bytes())["schema_version"] == SCHEMA_VERSION == "1.0"


def test_an_unknown_major_version_is_refused_with_a_reason_naming_it() -> None:
    event = progress()
    with pytest.raises(SchemaVersionError, match=r"schema_version 2\.0 is of major version 2"):
        decode_job_event(event.subject(), rewritten(event.to_bytes(), schema_version="2.0"))


def test_an_unknown_major_is_refused_for_its_version_even_when_its_fields_no_longer_fit() -> None:
    # A major bump may rename a field; the reason must be the version, not the missing field.
    event = progress()
    data = rewritten(event.to_bytes(), schema_version="2.1", epoch=None, total_epochs=None)
    with pytest.raises(SchemaVersionError, match="2.1"):
        decode_job_event(event.subject(), data)
    # ... or add a kind this reader has never heard of.
    with pytest.raises(SchemaVersionError, match="2.1"):
        decode_job_event(subjects.job_event("j1", "teleported"), data)


def test_every_decoder_checks_the_version() -> None:
    command = IngestDataset(dataset_id="d1", object_name="o", sha256="a" * 64, size_bytes=1, filename="d.zip")
    rejected = DatasetRejected(dataset_id="d1", reason="no images")
    exported = ExportCompleted(job_id="e1", attempt=1, training_job_id="j1")
    with pytest.raises(SchemaVersionError, match="major version 3"):
        IngestDataset.from_bytes(rewritten(command.to_bytes(), schema_version="3.0"))
    with pytest.raises(SchemaVersionError, match="major version 3"):
        decode_dataset_event(rejected.subject(), rewritten(rejected.to_bytes(), schema_version="3.0"))
    with pytest.raises(SchemaVersionError, match="major version 3"):
        decode_export_inference_event(exported.subject(), rewritten(exported.to_bytes(), schema_version="3.0"))


def test_a_message_without_a_version_reads_as_1x() -> None:
    # What the streams hold from before the version was on the wire: an integer `version`, no `schema_version`.
    event = progress()
    old = rewritten(event.to_bytes(), schema_version=None, version=1)
    decoded = decode_job_event(event.subject(), old)
    assert decoded.schema_version == SCHEMA_VERSION
    assert decoded.model_dump(exclude={"schema_version"}) == event.model_dump(exclude={"schema_version"})


def test_a_minor_bump_is_read_and_its_new_fields_ignored() -> None:
    event = progress()
    newer = rewritten(event.to_bytes(), schema_version="1.7", learning_rate_now=0.01)
    decoded = decode_job_event(event.subject(), newer)
    assert decoded.schema_version == "1.7" and decoded.metrics == {"loss": 0.5}


@pytest.mark.parametrize("version", ["one", "1.x", "", "2", 2])
def test_an_unreadable_or_other_major_version_is_refused(version: object) -> None:
    with pytest.raises(SchemaVersionError) as error:
        check_schema_version({"schema_version": version})
    assert repr(version) in error.value.reason or str(version) in error.value.reason


def test_the_version_is_read_from_headers_too() -> None:
    check_schema_version({SCHEMA_VERSION_HEADER: "1.3"})
    with pytest.raises(SchemaVersionError, match="major version 4"):
        check_schema_version({SCHEMA_VERSION_HEADER: "4.0"})
    check_schema_version(None)  # no headers: 1.x


def test_a_schema_version_error_is_a_value_error() -> None:
    # Consumers dead-letter every ValueError of a decoder (pydantic's ValidationError is one too).
    assert issubclass(SchemaVersionError, ValueError)
