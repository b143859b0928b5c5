"""Use cases over trainer capability manifests: the model catalogue, config schemas, job validation.

Everything here is derived from the manifests the runners publish (`shared.manifest`); nothing about
a model is known to the API otherwise.
"""

from __future__ import annotations

from typing import Any, Protocol

from visionyard.api.errors import InvalidInput, NotFound
from visionyard.shared.devices import DEVICE_KEY, GPU_COUNT_KEY, InvalidDeviceRequest, device_request
from visionyard.shared.manifest import ConfigField, ModelInfo, TrainerManifest, config_fields

# The frontend and the trainers name some task types differently; both spellings are accepted.
TASK_ALIASES: dict[str, str] = {
    "classification": "image_classification",
    "image_classification": "classification",
    "detection": "object_detection",
    "object_detection": "detection",
    "segmentation": "instance_segmentation",
    "instance_segmentation": "segmentation",
    "pose": "pose_estimation",
    "pose_estimation": "pose",
}
MAP_TASKS = ("detection", "object_detection", "segmentation", "instance_segmentation", "pose", "pose_estimation")


class CapabilitySource(Protocol):
    """Where the installed trainers' manifests come from (the `trainer_capabilities` KV bucket)."""

    async def manifests(self) -> list[TrainerManifest]:
        """Every known trainer manifest."""
        ...


def task_matches(requested: str, offered: str) -> bool:
    """Whether `requested` names the task type `offered`, directly or through its alias."""
    return requested == offered or TASK_ALIASES.get(requested) == offered


def canonical_task(requested: str, offered: list[str]) -> str | None:
    """The trainer's own spelling of `requested`, or None if it does not offer it."""
    for task in offered:
        if task_matches(requested, task):
            return task
    return None


def model_tasks(manifest: TrainerManifest, model: ModelInfo) -> list[str]:
    """The task types a model is trained for (its own list, else its trainer's)."""
    return list(model.task_types) or manifest.task_type_names()


def resolve_trainer(
    manifests: list[TrainerManifest], *, framework: str, model_name: str, task_type: str
) -> tuple[TrainerManifest, str]:
    """The manifest that can train this combination and its task spelling; InvalidInput naming the field."""
    frameworks = sorted({m.framework for m in manifests})
    candidates = [m for m in manifests if m.framework == framework]
    if not candidates:
        raise InvalidInput("config.framework", f"unknown framework {framework!r}; valid choices: {_choices(frameworks)}")
    models = sorted({model.model_name for m in candidates for model in m.models if model.supported})
    with_model = [m for m in candidates if model_name in m.model_names()]
    if not with_model:
        raise InvalidInput(
            "config.model_name", f"unknown model {model_name!r} for framework {framework!r}; valid choices: {_choices(models)}"
        )
    tasks: list[str] = []
    unsupported = False
    for manifest in with_model:
        model = manifest.model(model_name)
        assert model is not None
        if not model.supported:
            unsupported = True
            continue
        offered = model_tasks(manifest, model)
        tasks.extend(offered)
        task = canonical_task(task_type, offered)
        if task is not None:
            return manifest, task
    if unsupported and not tasks:
        raise InvalidInput(
            "config.model_name",
            f"model {model_name!r} of framework {framework!r} is declared unsupported by its trainer; "
            f"valid choices: {_choices(models)}",
        )
    raise InvalidInput(
        "config.task_type",
        f"model {model_name!r} does not support task type {task_type!r}; valid choices: {_choices(sorted(set(tasks)))}",
    )


def check_dataset_format(manifest: TrainerManifest, *, requested: str | None, actual: str | None) -> None:
    """Refuse a dataset format the trainer does not declare; InvalidInput naming the field."""
    declared = manifest.dataset_format_names()
    if requested is not None and requested not in declared:
        raise InvalidInput(
            "config.dataset_format",
            f"the {manifest.framework} trainer does not read {requested!r} datasets; valid choices: {_choices(declared)}",
        )
    if actual is not None and actual not in declared:
        raise InvalidInput(
            "config.dataset_id",
            f"the dataset is in {actual!r} format, which the {manifest.framework} trainer does not read; "
            f"it reads: {_choices(declared)}",
        )


def default_primary_metric(task_type: str, manifest: TrainerManifest | None = None) -> tuple[str, str]:
    """The metric a job optimizes when none is given: the trainer's own choice, else API.md's default."""
    if manifest is not None:
        for task, metric in manifest.primary_metric.items():
            if task_matches(task_type, task):
                return metric, "min" if "loss" in metric else "max"
    if task_matches(task_type, "classification") or task_matches(task_type, "image_classification"):
        return "accuracy", "max"
    if task_type in MAP_TASKS:
        return "mAP50", "max"
    return "loss", "min"


def model_entry(manifest: TrainerManifest, model: ModelInfo) -> dict[str, Any]:
    """One `/models/list` item: the model as its manifest declares it, plus framework and trainer facts."""
    entry = model.model_dump(mode="json")
    entry.update(
        framework=manifest.framework,
        task_types=model_tasks(manifest, model),
        tags=list(model.tags),
        trainer=manifest.name,
        framework_display_name=manifest.display_name,
        dataset_formats=manifest.dataset_format_names(),
        export_formats=model.export_formats if model.export_formats is not None else list(manifest.export_formats),
        supports_resume=manifest.supports_resume,
    )
    entry.setdefault("status", "supported" if model.supported else "unsupported")
    return entry


def list_models(
    manifests: list[TrainerManifest], *, framework: str | None, task_type: str | None, supported_only: bool = False
) -> list[dict[str, Any]]:
    """The models every trainer offers, optionally filtered (a model offered by two runners is listed once)."""
    result: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for manifest in manifests:
        if framework and manifest.framework != framework:
            continue
        for model in manifest.models:
            if supported_only and not model.supported:
                continue
            if task_type and canonical_task(task_type, model_tasks(manifest, model)) is None:
                continue
            key = (manifest.framework, model.model_name)
            if key in seen:
                continue
            seen.add(key)
            result.append(model_entry(manifest, model))
    return result


def framework_capabilities(manifests: list[TrainerManifest], framework: str) -> dict[str, Any]:
    """The framework's manifest in the original `capabilities.json` shape; NotFound naming the choices."""
    for manifest in manifests:
        if manifest.framework == framework:
            return manifest.capabilities()
    raise NotFound(f"framework: no trainer for framework {framework!r}; valid frameworks: {_frameworks(manifests)}")


def find_model(manifests: list[TrainerManifest], *, framework: str, model_name: str) -> tuple[TrainerManifest, ModelInfo]:
    """The manifest and entry of one model; NotFound naming what exists."""
    candidates = [m for m in manifests if m.framework == framework]
    if not candidates:
        raise NotFound(f"framework: no trainer for framework {framework!r}; valid frameworks: {_frameworks(manifests)}")
    for manifest in candidates:
        model = manifest.model(model_name)
        if model is not None:
            return manifest, model
    names = sorted({model.model_name for m in candidates for model in m.models})
    raise NotFound(f"model_name: no model {model_name!r} in framework {framework!r}; valid choices: {_choices(names)}")


def model_details(manifests: list[TrainerManifest], *, framework: str, model_name: str) -> dict[str, Any]:
    """`/models/get`: the model's manifest entry with its framework."""
    manifest, model = find_model(manifests, framework=framework, model_name=model_name)
    return model_entry(manifest, model)


def model_guide(manifests: list[TrainerManifest], *, framework: str, model_name: str) -> dict[str, Any]:
    """`/models/{framework}/{model}/guide`: the guide drawer's content, from the manifest entry.

    A manifest may carry a `guide` object per model (use_cases, pros, cons, when_to_use, ...); what it
    does not say is empty, never invented.
    """
    manifest, model = find_model(manifests, framework=framework, model_name=model_name)
    extra = model.model_extra or {}
    declared_guide = extra.get("guide")
    guide: dict[str, Any] = declared_guide if isinstance(declared_guide, dict) else {}
    parameters = model.parameters or {}
    summary = {
        "framework": manifest.framework,
        "model_name": model.model_name,
        "display_name": model.display_name,
        "description": model.description,
        "params": f"{parameters['min']}M" if "min" in parameters else "",
        "input_size": extra.get("input_size"),
        "task_types": model_tasks(manifest, model),
        "tags": list(model.tags),
        "supported": model.supported,
    }
    default_config = extra.get("default_config")
    return {
        "model": summary,
        "benchmark": guide.get("benchmark", extra.get("benchmark")) or {},
        "use_cases": list(guide.get("use_cases", [])),
        "pros": list(guide.get("pros", [])),
        "cons": list(guide.get("cons", [])),
        "when_to_use": guide.get("when_to_use") or model.description,
        "when_not_to_use": guide.get("when_not_to_use"),
        "alternatives": list(guide.get("alternatives", [])),
        "recommended_settings": guide.get("recommended_settings")
        or (default_config if isinstance(default_config, dict) else {}),
        "real_world_examples": list(guide.get("real_world_examples", [])),
        "special_features": guide.get("special_features", extra.get("special_features")),
    }


def config_schema(manifests: list[TrainerManifest], *, framework: str, task_type: str | None) -> dict[str, Any]:
    """The UI configuration schema of the trainer for `framework` (and task type), as fields and presets."""
    for manifest in manifests:
        if manifest.framework != framework:
            continue
        offered = manifest.task_type_names()
        task = canonical_task(task_type, offered) if task_type else None
        if task_type and task is None:
            continue
        fields, presets = config_fields(manifest.config_schema)
        metric, mode = default_primary_metric(task or (offered[0] if offered else ""), manifest)
        return {
            "framework": manifest.framework,
            "task_type": task or task_type,
            "trainer": manifest.name,
            "description": manifest.description,
            "version": manifest.version,
            "fields": [field.model_dump(mode="json") for field in fields],
            "presets": presets,
            "primary_metric": metric,
            "primary_metric_mode": mode,
            "metric_candidates": _metric_candidates(manifest, task),
        }
    raise NotFound(f"framework: no trainer for framework {framework!r}"
                   f"{' and task type ' + repr(task_type) if task_type else ''}; valid frameworks: {_frameworks(manifests)}")


def validate_advanced_config(
    manifests: list[TrainerManifest], config: dict[str, Any], *, framework: str | None
) -> dict[str, Any]:
    """Check advanced options against the trainer's declared fields: `{valid, errors, warnings, suggestions}`.

    Values outside a field's min/max or options, or of the wrong type, are errors; keys no trainer
    declares are warnings (a trainer may still read them). Without `framework` every trainer's fields count.
    """
    fields: dict[str, ConfigField] = {}
    for manifest in manifests:
        if framework and manifest.framework != framework:
            continue
        for field in config_fields(manifest.config_schema)[0]:
            fields.setdefault(field.name, field)
    errors: list[str] = []
    warnings: list[str] = []
    try:
        device_request(config)
    except InvalidDeviceRequest as error:
        errors.append(str(error))
    for key, value in config.items():
        declared = fields.get(key)
        if key in (DEVICE_KEY, GPU_COUNT_KEY):
            continue
        if declared is None:
            warnings.append(f"{key}: not a declared option of {framework or 'any installed trainer'}")
            continue
        problem = _field_problem(declared, value)
        if problem:
            errors.append(f"{key}: {problem}")
    return {"valid": not errors, "errors": errors, "warnings": errors + warnings, "suggestions": []}


def _field_problem(field: ConfigField, value: Any) -> str | None:
    if field.type == "bool":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if field.type in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float) or (field.type == "int" and not float(value).is_integer()):
            return f"{value!r} is not a{'n integer' if field.type == 'int' else ' number'}"
        if field.min is not None and value < field.min:
            return f"{value} is below the minimum {field.min}"
        if field.max is not None and value > field.max:
            return f"{value} is above the maximum {field.max}"
        return None
    if field.type == "select" and field.options is not None and value not in field.options:
        return f"{value!r} is not one of {', '.join(map(str, field.options))}"
    if field.type == "multiselect" and field.options is not None:
        chosen = value if isinstance(value, list) else [value]
        unknown = [item for item in chosen if item not in field.options]
        return f"{unknown!r} not in {', '.join(map(str, field.options))}" if unknown else None
    return None


def _metric_candidates(manifest: TrainerManifest, task: str | None) -> list[Any]:
    by_task = (manifest.model_extra or {}).get("metric_candidates_by_task")
    if not isinstance(by_task, dict) or task is None:
        return []
    candidates = by_task.get(task)
    return list(candidates) if isinstance(candidates, list) else []


def _frameworks(manifests: list[TrainerManifest]) -> str:
    return _choices(sorted({m.framework for m in manifests}))


def _choices(values: list[str]) -> str:
    return ", ".join(values) if values else "(none installed)"
