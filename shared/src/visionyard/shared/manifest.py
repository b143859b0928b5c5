"""Trainer capability manifests: what a trainer can train, as the frontend and the API see it.

A manifest has the original platform's `capabilities.json` shape (framework, display_name,
description, version, models, task_types, dataset_formats, and the optional config_schema,
export_formats, metric_candidates_by_task, ...), so a trainer directory written for that platform is
read as it is. Beside it sit the fields only Visionyard's runner needs: how to start the trainer
(`module` for a package, `entrypoint` for a directory), which environment's interpreter runs it,
the export/predict modules and whether it resumes.

A trainer package registers its manifest under the `visionyard.trainers` entry-point group; a trainer
directory is read from its `capabilities.json` (`load_directory_manifest`). The runner publishes the
manifests it can run to the `trainer_capabilities` KV bucket; the API answers `models/list`,
`models/capabilities/{framework}` and `training/config-schema` and validates new jobs from there.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENTRY_POINT_GROUP = "visionyard.trainers"
CAPABILITIES_FILE = "capabilities.json"
DIRECTORY_ENTRYPOINT = "train.py"

# Fields of the runner's own, never shown in the original `capabilities.json` shape.
RUNNER_FIELDS = frozenset(
    {"name", "module", "entrypoint", "directory", "sdk", "environment", "export_module", "predict_module",
     "supports_resume", "primary_metric"}
)

FieldType = Literal["int", "float", "str", "bool", "select", "multiselect"]


def _named_item(value: Any) -> Any:
    """`"detection"` → `{"name": "detection", ...}`: both spellings of the original appear in its trainers."""
    if isinstance(value, str):
        return {"name": value, "display_name": value.replace("_", " ").title()}
    return value


class NamedCapability(BaseModel):
    """A task type or dataset format a trainer declares (`{name, display_name, description, supported}`)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    display_name: str = ""
    description: str = ""
    supported: bool = True


class ModelInfo(BaseModel):
    """One model a trainer offers (a `models[]` entry of `capabilities.json`); unknown keys are kept."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_name: str = Field(min_length=1)
    display_name: str
    task_types: list[str]
    description: str = ""
    supported: bool = True
    # The original writes `{"min": 1.8, "macs": 6.5}` (millions of parameters); a bare number is read as `min`.
    parameters: dict[str, Any] | None = None
    config_schema: Any = None
    export_formats: list[str] | None = None
    pretrained: Any = None
    validated: bool | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("parameters must be an object or a number")
        if isinstance(value, int | float):
            return {"min": value}
        return value


class TrainerManifest(BaseModel):
    """A trainer's capabilities (original shape) and how Visionyard runs it (the runner's fields)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    # -- the original `capabilities.json` -------------------------------------------------------
    framework: str = Field(min_length=1)
    display_name: str = ""
    description: str = ""
    version: str = "0.0.0"
    models: list[ModelInfo]
    task_types: list[NamedCapability]
    dataset_formats: list[NamedCapability]
    config_schema: Any = None
    export_formats: list[str] = Field(default_factory=list)

    # -- Visionyard's runner ----------------------------------------------------------------------
    name: str = Field(default="", description="unique trainer id (KV key); the framework when not given")
    module: str | None = Field(default=None, description="python module run as `python -m module` by the runner")
    entrypoint: str | None = Field(
        default=None, description="script run as `python <entrypoint> --log-level INFO` in `directory` (original trainers)"
    )
    directory: str | None = Field(default=None, description="the trainer directory (original trainers)")
    sdk: Literal["visionyard", "original"] = Field(
        default="visionyard", description="how the trainer reports: Visionyard's pipe SDK or the original trainer_sdk API"
    )
    environment: str | None = Field(
        default=None, description="named trainer environment whose interpreter runs it (runner setting trainer_envs)"
    )
    primary_metric: dict[str, str] = Field(default_factory=dict, description="task type → metric")
    supports_resume: bool = True
    export_module: str | None = Field(default=None, description="module run as `python -m` to export")
    predict_module: str | None = Field(default=None, description="module run as `python -m` to predict")

    @field_validator("task_types", "dataset_formats", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_named_item(item) for item in value]
        return value

    @model_validator(mode="after")
    def _runnable(self) -> TrainerManifest:
        if not self.name:
            self.name = self.framework
        if self.module is None and self.entrypoint is None:
            raise ValueError("a trainer manifest needs `module` (a package) or `entrypoint` (a directory)")
        if not self.models:
            raise ValueError("models: a trainer must offer at least one model")
        config_fields(self.config_schema)  # a schema the UI cannot read is refused when the manifest is read
        return self

    def model_names(self) -> set[str]:
        """Every model name this trainer accepts."""
        return {model.model_name for model in self.models}

    def model(self, model_name: str) -> ModelInfo | None:
        """The model entry named `model_name`, or None."""
        return next((model for model in self.models if model.model_name == model_name), None)

    def task_type_names(self) -> list[str]:
        """The task types this trainer declares."""
        return [task.name for task in self.task_types if task.supported]

    def dataset_format_names(self) -> list[str]:
        """The dataset formats this trainer declares it reads."""
        return [fmt.name for fmt in self.dataset_formats if fmt.supported]

    def capabilities(self) -> dict[str, Any]:
        """The manifest in the original `capabilities.json` shape (without the runner's fields)."""
        return self.model_dump(mode="json", exclude=set(RUNNER_FIELDS))


class ConfigField(BaseModel):
    """One field of a trainer's configuration UI, as the original frontend's DynamicConfigPanel reads it."""

    model_config = ConfigDict(extra="allow")

    name: str
    type: FieldType
    default: Any = None
    primary: bool = False
    advanced: bool = False
    group: str = "general"
    label: str = ""
    description: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: list[Any] | None = None


_TYPE_NAMES: dict[str, FieldType] = {
    "int": "int", "integer": "int", "float": "float", "number": "float", "str": "str", "string": "str",
    "bool": "bool", "boolean": "bool", "select": "select", "enum": "select", "multiselect": "multiselect",
    "array": "multiselect", "tuple": "str", "list": "str",
}


def _label(name: str) -> str:
    return re.sub(r"[_\-]+", " ", name).strip().capitalize()


def _field(name: str, spec: dict[str, Any], *, group: str | None = None) -> ConfigField:
    """One field from any of the original's spellings (its field list, a name→spec map, or JSON Schema)."""
    raw_type = str(spec.get("type", "str")).lower()
    options = spec.get("options", spec.get("enum"))
    if options is None and isinstance(spec.get("items"), dict):
        options = spec["items"].get("enum")
    field_type = _TYPE_NAMES.get(raw_type)
    if field_type is None:
        raise ValueError(f"config_schema.{name}: unknown field type {raw_type!r}")
    if options is not None and field_type in ("str", "int", "float"):
        field_type = "select"
    known = {"name", "type", "default", "primary", "advanced", "group", "label", "title", "description", "min",
             "minimum", "max", "maximum", "step", "options", "enum", "items"}
    return ConfigField(
        name=name,
        type=field_type,
        default=spec.get("default"),
        primary=bool(spec.get("primary", False)),
        advanced=bool(spec.get("advanced", False)),
        group=str(spec.get("group") or group or "general"),
        label=str(spec.get("label") or spec.get("title") or _label(name)),
        description=str(spec.get("description") or spec.get("title") or ""),
        min=spec.get("min", spec.get("minimum")),
        max=spec.get("max", spec.get("maximum")),
        step=spec.get("step"),
        options=list(options) if options is not None else None,
        **{key: value for key, value in spec.items() if key not in known},
    )


def config_fields(schema: Any) -> tuple[list[ConfigField], dict[str, dict[str, Any]]]:
    """A config schema in any shape the original's trainers use → (UI fields, presets).

    Accepted: `{fields: [...], presets: {...}}` (Ultralytics' config_schema.py), `{name: {type, default,
    ...}}` (mmdet), `{group: {name: {...}}}` (vfm-v1's basic/advanced), and JSON Schema (`properties`).
    """
    if schema is None or schema == {}:
        return [], {}
    if not isinstance(schema, dict):
        raise ValueError("config_schema must be an object")
    presets = schema.get("presets") or {}
    if not isinstance(presets, dict):
        raise ValueError("config_schema.presets must be an object")
    if "fields" in schema:
        fields = schema["fields"]
        if not isinstance(fields, list):
            raise ValueError("config_schema.fields must be a list")
        result = []
        for index, spec in enumerate(fields):
            if not isinstance(spec, dict) or not spec.get("name"):
                raise ValueError(f"config_schema.fields[{index}] must be an object with a name")
            result.append(_field(str(spec["name"]), spec))
        return result, presets
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            raise ValueError("config_schema.properties must be an object")
        return [_field(name, spec) for name, spec in properties.items() if isinstance(spec, dict)], presets
    result = []
    for name, spec in schema.items():
        if name == "presets" or not isinstance(spec, dict):
            continue
        if "type" in spec:
            result.append(_field(name, spec))
        else:  # a group of fields (vfm-v1: {"basic": {...}, "advanced": {...}})
            for inner, inner_spec in spec.items():
                if isinstance(inner_spec, dict):
                    result.append(_field(inner, {"advanced": name == "advanced", **inner_spec}, group=name))
    return result, presets


def kv_safe_name(name: str) -> str:
    """`name` with every character a NATS KV key refuses replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_=.-]", "_", name).strip(".") or "trainer"


def installed_manifests() -> list[TrainerManifest]:
    """The manifests of every trainer installed in this environment."""
    manifests: list[TrainerManifest] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        manifests.append(loaded if isinstance(loaded, TrainerManifest) else TrainerManifest.model_validate(loaded))
    return manifests


def load_directory_manifest(directory: str | Path) -> TrainerManifest:
    """The manifest of an original-platform trainer directory (`train.py` + `capabilities.json`).

    Raises ValueError naming the file and the reason when the directory is not such a trainer.
    """
    root = Path(directory).resolve()
    capabilities = root / CAPABILITIES_FILE
    if not (root / DIRECTORY_ENTRYPOINT).is_file():
        raise ValueError(f"{root}: no {DIRECTORY_ENTRYPOINT}")
    if not capabilities.is_file():
        raise ValueError(f"{root}: no {CAPABILITIES_FILE}")
    try:
        data = json.loads(capabilities.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{capabilities}: not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{capabilities}: not a JSON object")
    data.setdefault("name", kv_safe_name(f"{data.get('framework', 'trainer')}.{root.name}"))
    data.setdefault("entrypoint", DIRECTORY_ENTRYPOINT)
    data.setdefault("sdk", "original")
    data["directory"] = str(root)
    try:
        return TrainerManifest.model_validate(data)
    except ValueError as error:
        raise ValueError(f"{capabilities}: {error}") from error
