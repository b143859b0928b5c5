"""The AsyncAPI 3.0 document of every command and event, generated from the pydantic contracts.

The contracts in `commands.py` and `events.py` are the single source of truth; this module only
describes them. `python -m visionyard.shared.asyncapi` prints the document; the API serves it at
`/asyncapi.json`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from visionyard.shared import commands, events, streams, subjects

_COMMANDS: dict[str, type[BaseModel]] = {
    subjects.CMD_TRAIN: commands.StartTraining,
    subjects.CMD_DATASET_INGEST: commands.IngestDataset,
    subjects.CMD_DATASET_DELETE: commands.DeleteDataset,
    subjects.CMD_UPLOAD_DELETE: commands.DeleteUploads,
    subjects.CMD_EXPORT: commands.StartExport,
    subjects.CMD_INFER: commands.StartInference,
}


def _channel(address: str, message_name: str, description: str) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "messages": {message_name: {"$ref": f"#/components/messages/{message_name}"}},
    }


def asyncapi_document() -> dict[str, Any]:
    """The whole document as a dict."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}

    def add_message(model: type[BaseModel], summary: str) -> str:
        name = model.__name__
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas[def_name] = definition
        schemas[name] = schema
        messages[name] = {
            "name": name,
            "summary": summary,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
            "headers": {"type": "object", "properties": {"Nats-Msg-Id": {"type": "string"}}},
        }
        return name

    for subject, model in _COMMANDS.items():
        name = add_message(model, (model.__doc__ or "").strip())
        channels[subject.replace(".", "_")] = _channel(subject, name, f"Command stream {streams.COMMANDS.name}")
    channels["cmd_train_gpu"] = _channel(
        subjects.CMD_TRAIN_GPU_PREFIX + ".{gpu_count}", commands.StartTraining.__name__,
        f"Command stream {streams.COMMANDS.name}; a training job that needs `gpu_count` GPUs (shared/devices.py)",
    )
    for kind, model in events.JOB_EVENT_TYPES.items():
        name = add_message(model, (model.__doc__ or "").strip())
        channels[f"job_{kind}"] = _channel(
            "evt.job.{job_id}." + kind, name, f"Event stream {streams.EVENTS.name}; per-job `seq` and `attempt`"
        )
    for (family, kind), ship_model in events.SHIP_EVENT_TYPES.items():
        name = add_message(ship_model, (ship_model.__doc__ or "").strip())
        channels[f"{family}_{kind}"] = _channel(
            f"evt.{family}.{{{family}_id}}.{kind}", name, f"Event stream {streams.EVENTS.name}; export/inference jobs"
        )
    for kind, model in events.DATASET_EVENT_TYPES.items():
        name = add_message(model, (model.__doc__ or "").strip())
        channels[f"dataset_{kind}"] = _channel("evt.dataset.{dataset_id}." + kind, name, "Dataset events")
    operations = {
        f"receive_{channel}": {"action": "receive", "channel": {"$ref": f"#/channels/{channel}"}}
        for channel in channels
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Visionyard events",
            "version": "1.0.0",
            "description": "Commands (work-queue stream COMMANDS) and events (stream EVENTS) on NATS JetStream.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


if __name__ == "__main__":
    print(json.dumps(asyncapi_document(), indent=2, default=str))
