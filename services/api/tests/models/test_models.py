"""The model catalogue and config schemas, derived only from the manifests runners publish to KV."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import DatasetReady
from visionyard.shared.manifest import TrainerManifest

from ..conftest import until

JOBS = "/api/v1/training/jobs"

# A trainer directory's capabilities.json as the original platform writes it (objects for task types and
# formats, `parameters` as {min, macs}, unsupported models, a name→spec config schema, extra keys).
ORIGINAL = {
    "framework": "ultralytics",
    "display_name": "Ultralytics YOLO",
    "description": "YOLO series models",
    "version": "1.0.0",
    "models": [
        {"model_name": "yolo11n", "display_name": "YOLO11 Nano", "task_types": ["detection"],
         "description": "Fastest YOLO11", "parameters": {"min": 1.8, "macs": 6.5}, "supported": True,
         "validated": True, "validation_date": "2025-11-17T09:53:30"},
        {"model_name": "yolo11n-seg", "display_name": "YOLO11 Nano Seg", "task_types": ["segmentation"],
         "description": "Segmentation", "supported": True,
         "guide": {"pros": ["fast"], "cons": ["small"], "use_cases": ["edge"]}},
        {"model_name": "sam2_t", "display_name": "SAM 2 Tiny", "task_types": ["segmentation"],
         "description": "not trainable here", "supported": False, "validation_error": "boom"},
        {"model_name": "org/vit-tiny", "display_name": "ViT Tiny", "task_types": ["detection"],
         "description": "a slash in the name", "supported": True},
    ],
    "task_types": [
        {"name": "detection", "display_name": "Object Detection", "description": "boxes", "supported": True},
        {"name": "segmentation", "display_name": "Instance Segmentation", "description": "masks", "supported": True},
    ],
    "dataset_formats": [
        {"name": "yolo", "display_name": "YOLO Format", "description": "native", "supported": True},
        {"name": "coco", "display_name": "COCO Format", "description": "converted", "supported": True},
    ],
    "config_schema": {
        "optimizer": {"type": "select", "default": "SGD", "options": ["SGD", "AdamW"], "description": "Optimizer"},
        "warmup_iters": {"type": "int", "default": 500, "min": 0, "max": 5000, "description": "Warmup"},
        "pretrained": {"type": "bool", "default": True, "description": "Pretrained backbone"},
        "presets": {"easy": {"optimizer": "SGD"}},
    },
    "export_formats": ["onnx"],
    "metric_candidates_by_task": {"detection": [{"value": "mAP50", "mode": "max"}]},
    # the runner's own fields, which /capabilities must not show
    "name": "ultralytics.yolo", "entrypoint": "train.py", "sdk": "original", "directory": "/srv/trainers/yolo",
}


async def _publish(bus: Bus, manifest: dict[str, Any]) -> TrainerManifest:
    parsed = TrainerManifest.model_validate(manifest)
    kv = await bus.kv(streams.KV_CAPABILITIES)
    await kv.put(parsed.name, parsed.model_dump_json().encode())
    return parsed


async def test_models_list_is_a_bare_array_with_the_fields_the_frontend_reads(client: httpx.AsyncClient, bus: Bus) -> None:
    await _publish(bus, ORIGINAL)
    listed = (await client.get("/api/v1/models/list", params={"supported_only": "false"})).json()
    assert isinstance(listed, list)
    by_name = {m["model_name"]: m for m in listed}
    assert set(by_name) == {"simple_cnn", "tiny_resnet", "yolo11n", "yolo11n-seg", "sam2_t", "org/vit-tiny"}
    nano = by_name["yolo11n"]
    assert (nano["framework"], nano["display_name"], nano["task_types"][0]) == ("ultralytics", "YOLO11 Nano", "detection")
    assert nano["parameters"]["min"] == 1.8 and nano["validated"] is True and nano["supported"] is True
    assert nano["tags"] == [] and nano["validation_date"] == "2025-11-17T09:53:30"  # unknown keys pass through
    assert nano["dataset_formats"] == ["yolo", "coco"] and nano["export_formats"] == ["onnx"]
    assert by_name["sam2_t"]["supported"] is False and by_name["sam2_t"]["status"] == "unsupported"

    supported = (await client.get("/api/v1/models/list")).json()
    assert "sam2_t" not in {m["model_name"] for m in supported}  # supported_only defaults to true, as upstream
    detection = (await client.get("/api/v1/models/list", params={"task_type": "object_detection"})).json()
    assert {m["model_name"] for m in detection} == {"yolo11n", "org/vit-tiny"}
    pytorch = (await client.get("/api/v1/models/list", params={"framework": "pytorch"})).json()
    assert {m["model_name"] for m in pytorch} == {"simple_cnn", "tiny_resnet"}


async def test_capabilities_get_and_guide_come_from_the_manifest(client: httpx.AsyncClient, bus: Bus) -> None:
    await _publish(bus, ORIGINAL)
    capabilities = (await client.get("/api/v1/models/capabilities/ultralytics")).json()
    assert capabilities["framework"] == "ultralytics" and capabilities["version"] == "1.0.0"
    assert capabilities["task_types"][0] == {"name": "detection", "display_name": "Object Detection",
                                             "description": "boxes", "supported": True}
    assert capabilities["metric_candidates_by_task"]["detection"][0]["value"] == "mAP50"
    assert not {"entrypoint", "directory", "sdk", "module", "environment"} & set(capabilities)
    missing = await client.get("/api/v1/models/capabilities/jax")
    assert missing.status_code == 404 and "ultralytics" in missing.json()["detail"]

    got = (await client.get("/api/v1/models/get", params={"framework": "ultralytics", "model_name": "org/vit-tiny"})).json()
    assert got["display_name"] == "ViT Tiny" and got["framework"] == "ultralytics"
    by_path = (await client.get("/api/v1/models/ultralytics/org/vit-tiny")).json()
    assert by_path["model_name"] == "org/vit-tiny"
    unknown = await client.get("/api/v1/models/get", params={"framework": "ultralytics", "model_name": "yolo99"})
    assert unknown.status_code == 404 and "model_name" in unknown.json()["detail"] and "yolo11n" in unknown.json()["detail"]

    guide = (await client.get("/api/v1/models/ultralytics/yolo11n-seg/guide")).json()
    assert guide["model"]["display_name"] == "YOLO11 Nano Seg" and guide["model"]["tags"] == []
    assert (guide["pros"], guide["cons"], guide["use_cases"]) == (["fast"], ["small"], ["edge"])
    slashed = (await client.get("/api/v1/models/ultralytics/org/vit-tiny/guide")).json()
    assert slashed["model"]["model_name"] == "org/vit-tiny" and slashed["alternatives"] == []
    assert slashed["model"]["params"] == "" and slashed["benchmark"] == {}


async def test_config_schema_is_fields_and_presets_from_any_original_spelling(client: httpx.AsyncClient, bus: Bus) -> None:
    await _publish(bus, ORIGINAL)
    schema = (await client.get("/api/v1/training/config-schema",
                               params={"framework": "ultralytics", "task_type": "detection"})).json()
    assert (schema["framework"], schema["task_type"]) == ("ultralytics", "detection")
    fields = {f["name"]: f for f in schema["fields"]}
    assert set(fields) == {"optimizer", "warmup_iters", "pretrained"}
    assert fields["optimizer"]["type"] == "select" and fields["optimizer"]["options"] == ["SGD", "AdamW"]
    assert (fields["warmup_iters"]["type"], fields["warmup_iters"]["min"], fields["warmup_iters"]["max"]) == ("int", 0, 5000)
    assert fields["pretrained"]["type"] == "bool" and fields["pretrained"]["label"] == "Pretrained"
    assert all({"name", "type", "default", "primary", "group", "label", "description", "min", "max", "options"} <= set(f)
               for f in schema["fields"])
    assert schema["presets"] == {"easy": {"optimizer": "SGD"}}
    assert schema["primary_metric"] == "mAP50" and schema["metric_candidates"][0]["value"] == "mAP50"

    json_schema = {**ORIGINAL, "framework": "jsonschema", "name": "jsonschema",
                   "config_schema": {"type": "object", "properties": {
                       "size": {"type": "integer", "default": 32, "minimum": 8, "maximum": 512, "title": "Image size"},
                       "opt": {"type": "string", "enum": ["adam", "sgd"], "default": "adam"}}}}
    await _publish(bus, json_schema)
    schema = (await client.get("/api/v1/training/config-schema", params={"framework": "jsonschema"})).json()
    fields = {f["name"]: f for f in schema["fields"]}
    assert (fields["size"]["type"], fields["size"]["min"], fields["size"]["label"]) == ("int", 8, "Image size")
    assert fields["opt"]["type"] == "select" and schema["presets"] == {}

    wrong_task = await client.get("/api/v1/training/config-schema", params={"framework": "pytorch", "task_type": "pose"})
    assert wrong_task.status_code == 404 and "framework" in wrong_task.json()["detail"]


async def _ready(client: httpx.AsyncClient, bus: Bus, *, fmt: str) -> str:
    dataset_id = (await client.post("/api/v1/datasets", json={"name": fmt, "visibility": "private"})).json()["dataset_id"]
    await bus.publish(DatasetReady(
        dataset_id=dataset_id, content_hash=f"hash-{fmt}", format=fmt, num_images=10, num_classes=2,
        class_names=["a", "b"], size_bytes=100, uri="file:///d.zip",
    ))

    async def ready() -> bool:
        return (await client.get(f"/api/v1/datasets/{dataset_id}")).json()["status"] == "ready"

    await until(ready)
    return dataset_id


async def test_a_job_is_refused_for_what_its_trainer_does_not_declare(client: httpx.AsyncClient, bus: Bus) -> None:
    await _publish(bus, ORIGINAL)
    yolo_data = await _ready(client, bus, fmt="yolo")
    folder_data = await _ready(client, bus, fmt="imagefolder")

    def body(dataset_id: str, **config: Any) -> dict[str, Any]:
        return {"config": {"framework": "ultralytics", "model_name": "yolo11n", "task_type": "detection",
                           "dataset_id": dataset_id, "epochs": 1, **config}}

    cases = [
        (body(folder_data), "config.dataset_id", "imagefolder"),  # the dataset's real format is not declared
        (body(yolo_data, dataset_format="dice"), "config.dataset_format", "yolo, coco"),
        (body(yolo_data, model_name="sam2_t", task_type="segmentation"), "config.model_name", "unsupported"),
        (body(yolo_data, task_type="segmentation"), "config.task_type", "detection"),
        (body(yolo_data, model_name="yolo99"), "config.model_name", "yolo11n"),
    ]
    for request, field, mention in cases:
        refused = await client.post(JOBS, json=request)
        assert refused.status_code == 422, (field, refused.text)
        assert refused.json()["detail"].startswith(field) and mention in refused.json()["detail"], refused.text
    assert (await client.get(JOBS)).json()["total"] == 0

    accepted = await client.post(JOBS, json=body(yolo_data, task_type="object_detection"))
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["task_type"] == "detection" and accepted.json()["primary_metric"] == "mAP50"


async def test_device_requests_are_validated_and_a_gpu_job_is_queued_on_its_own_subject(
    client: httpx.AsyncClient, bus: Bus
) -> None:
    await _publish(bus, ORIGINAL)
    dataset_id = await _ready(client, bus, fmt="yolo")

    def body(**advanced: Any) -> dict[str, Any]:
        return {"config": {"framework": "ultralytics", "model_name": "yolo11n", "task_type": "detection",
                           "dataset_id": dataset_id, "epochs": 1, "advanced_config": advanced}}

    for advanced, field in (({"device": "tpu"}, "config.advanced_config.device"),
                            ({"device": "gpu", "gpu_count": 0}, "config.advanced_config.gpu_count")):
        refused = await client.post(JOBS, json=body(**advanced))
        assert refused.status_code == 422 and refused.json()["detail"].startswith(field), refused.text
    # A runner with two GPUs and free slots: the scheduler admits both jobs to it.
    devices = await bus.kv(streams.KV_RUNNER_DEVICES)
    await devices.put("r1", json.dumps({"runner_id": "r1", "slots": 4, "gpus": ["0", "1"], "free_gpus": ["0", "1"],
                                        "export_inference_held": 0, "advertise_seconds": 60, "updated_at": time.time()}).encode())
    gpu_job = (await client.post(JOBS, json=body(device="gpu", gpu_count=2))).json()
    cpu_job = (await client.post(JOBS, json=body())).json()
    for job in (gpu_job, cpu_job):
        assert (await client.post(f"{JOBS}/{job['id']}/start")).status_code == 200

    async def admitted() -> dict[str, int] | None:
        info = await bus.js.stream_info(streams.COMMANDS.name, subjects_filter="cmd.train.>")
        found = info.state.subjects or {}
        return found if len(found) == 2 else None

    # Each on its device's subject, one subject per attempt: the GPU job where only runners with 2 free GPUs pull.
    assert await until(admitted) == {subjects.admitted_train(str(gpu_job["id"]), 1, gpus=2): 1,
                                     subjects.admitted_train(str(cpu_job["id"]), 1, gpus=0): 1}
    assert subjects.admitted_train(str(gpu_job["id"]), 1, gpus=2).startswith("cmd.train.gpu.2.")


async def test_advanced_config_is_checked_against_the_declared_fields(client: httpx.AsyncClient, bus: Bus) -> None:
    await _publish(bus, ORIGINAL)
    good = (await client.post("/api/v1/training/config/validate", params={"framework": "ultralytics"},
                              json={"optimizer": "AdamW", "warmup_iters": 100, "pretrained": False})).json()
    assert good == {"valid": True, "errors": [], "warnings": [], "suggestions": []}
    bad = (await client.post("/api/v1/training/config/validate", params={"framework": "ultralytics"},
                             json={"optimizer": "Lion", "warmup_iters": 9000, "pretrained": "yes", "mystery": 1,
                                   "device": "tpu"})).json()
    assert bad["valid"] is False
    assert any(e.startswith("optimizer: 'Lion' is not one of SGD, AdamW") for e in bad["errors"])
    assert any(e.startswith("warmup_iters: 9000 is above the maximum 5000") for e in bad["errors"])
    assert any(e.startswith("pretrained:") for e in bad["errors"])
    assert any(e.startswith("advanced_config.device:") for e in bad["errors"])
    assert any(w.startswith("mystery: not a declared option") for w in bad["warnings"])
    # Without a framework (as the original frontend calls it) every trainer's fields count.
    pytorch = (await client.post("/api/v1/training/config/validate", json={"epochs": 3})).json()
    assert pytorch["valid"] is True


async def test_the_catalogue_needs_no_credential_even_when_authentication_is_on(bus: Bus, settings: Any) -> None:
    from visionyard.api.main import create_app

    await _publish(bus, ORIGINAL)
    app = create_app(settings.model_copy(update={"anonymous_as_admin": False}), bus=bus)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
            assert (await http.get(JOBS)).status_code == 401  # user data stays behind a credential
            listed = await http.get("/api/v1/models/list")
            assert listed.status_code == 200 and any(m["model_name"] == "yolo11n" for m in listed.json())
            schema = await http.get("/api/v1/training/config-schema", params={"framework": "ultralytics"})
            assert schema.status_code == 200
