"""Trainer manifests in the original capabilities.json shape, and config schemas in every spelling its trainers use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visionyard.shared.manifest import TrainerManifest, config_fields, kv_safe_name, load_directory_manifest

BASE = {
    "framework": "timm", "display_name": "timm", "description": "d", "version": "0.9.12",
    "models": [{"model_name": "resnet18", "display_name": "ResNet-18", "task_types": ["image_classification"],
                "description": "r", "supported": True, "parameters": 11.7, "benchmark": {"top1": 69.8}}],
    "task_types": ["image_classification", {"name": "detection", "display_name": "Det", "supported": False}],
    "dataset_formats": [{"name": "imagefolder", "display_name": "ImageFolder", "description": "", "supported": True}],
}


def test_both_spellings_of_task_types_are_read_and_unknown_keys_kept() -> None:
    manifest = TrainerManifest.model_validate({**BASE, "module": "x.train"})
    assert manifest.name == "timm" and manifest.task_type_names() == ["image_classification"]  # unsupported left out
    assert manifest.task_types[0].display_name == "Image Classification"
    model = manifest.models[0]
    assert model.parameters == {"min": 11.7} and (model.model_extra or {})["benchmark"] == {"top1": 69.8}
    shown = manifest.capabilities()
    assert "module" not in shown and shown["task_types"][1]["supported"] is False


def test_a_manifest_without_a_way_to_run_or_without_models_is_refused() -> None:
    with pytest.raises(ValueError, match="needs `module`"):
        TrainerManifest.model_validate(BASE)
    with pytest.raises(ValueError, match="at least one model"):
        TrainerManifest.model_validate({**BASE, "module": "x", "models": []})


def test_config_schemas_in_every_original_spelling_become_fields() -> None:
    listed, presets = config_fields({"fields": [{"name": "imgsz", "type": "int", "default": 640, "min": 32,
                                                 "primary": True, "group": "basic"}], "presets": {"easy": {"imgsz": 320}}})
    assert (listed[0].name, listed[0].type, listed[0].primary, listed[0].group) == ("imgsz", "int", True, "basic")
    assert presets == {"easy": {"imgsz": 320}}
    grouped, _ = config_fields({"basic": {"epochs": {"type": "integer", "default": 100}},
                                "advanced": {"amp": {"type": "boolean", "default": False}}})
    assert [(f.name, f.type, f.group, f.advanced) for f in grouped] == [("epochs", "int", "basic", False),
                                                                       ("amp", "bool", "advanced", True)]
    flat, _ = config_fields({"img_scale": {"type": "tuple", "default": [1333, 800]},
                             "lr_scheduler": {"type": "select", "options": ["step", "cosine"], "default": "step"}})
    assert [(f.name, f.type) for f in flat] == [("img_scale", "str"), ("lr_scheduler", "select")]
    assert config_fields(None) == ([], {}) and config_fields({}) == ([], {})
    with pytest.raises(ValueError, match="config_schema.x: unknown field type 'matrix'"):
        config_fields({"x": {"type": "matrix"}})


def test_a_trainer_directory_is_read_from_its_capabilities_file(tmp_path: Path) -> None:
    directory = tmp_path / "my trainer"
    directory.mkdir()
    with pytest.raises(ValueError, match="no train.py"):
        load_directory_manifest(directory)
    (directory / "train.py").write_text("")
    with pytest.raises(ValueError, match="no capabilities.json"):
        load_directory_manifest(directory)
    (directory / "capabilities.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_directory_manifest(directory)
    (directory / "capabilities.json").write_text(json.dumps(BASE))
    manifest = load_directory_manifest(directory)
    assert (manifest.entrypoint, manifest.sdk, manifest.directory) == ("train.py", "original", str(directory.resolve()))
    assert manifest.name == "timm.my_trainer" == kv_safe_name("timm.my trainer")
