"""Use cases over trainer capability manifests: model lists, config schemas, job validation."""

from __future__ import annotations

from typing import Any, Protocol

from visionyard.api.errors import InvalidInput, NotFound
from visionyard.shared.manifest import TrainerManifest

# The frontend and the trainers name some task types differently; both spellings are accepted.
TASK_ALIASES: dict[str, str] = {
    "classification": "image_classification",
    "image_classification": "classification",
    "detection": "object_detection",
    "object_detection": "detection",
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


def resolve_trainer(
    manifests: list[TrainerManifest], *, framework: str, model_name: str, task_type: str
) -> tuple[TrainerManifest, str]:
    """The manifest that can train this combination and its task spelling; InvalidInput naming the field."""
    frameworks = sorted({m.framework for m in manifests})
    candidates = [m for m in manifests if m.framework == framework]
    if not candidates:
        raise InvalidInput("config.framework", f"unknown framework {framework!r}; valid choices: {_choices(frameworks)}")
    models = sorted({name for m in candidates for name in m.model_names()})
    with_model = [m for m in candidates if model_name in m.model_names()]
    if not with_model:
        raise InvalidInput(
            "config.model_name", f"unknown model {model_name!r} for framework {framework!r}; valid choices: {_choices(models)}"
        )
    tasks: list[str] = []
    for manifest in with_model:
        for model in manifest.models:
            if model.model_name != model_name:
                continue
            offered = model.task_types or manifest.task_types
            tasks.extend(offered)
            task = canonical_task(task_type, offered)
            if task is not None:
                return manifest, task
    raise InvalidInput(
        "config.task_type",
        f"model {model_name!r} does not support task type {task_type!r}; valid choices: {_choices(sorted(set(tasks)))}",
    )


def default_primary_metric(task_type: str) -> tuple[str, str]:
    """The metric a job optimizes when none is given (API.md)."""
    if task_matches(task_type, "classification") or task_matches(task_type, "image_classification"):
        return "accuracy", "max"
    if task_type in MAP_TASKS:
        return "mAP50", "max"
    return "loss", "min"


def list_models(manifests: list[TrainerManifest], *, framework: str | None, task_type: str | None) -> list[dict[str, Any]]:
    """The models every trainer offers, optionally filtered."""
    result: list[dict[str, Any]] = []
    for manifest in manifests:
        if framework and manifest.framework != framework:
            continue
        for model in manifest.models:
            offered = model.task_types or manifest.task_types
            if task_type and canonical_task(task_type, offered) is None:
                continue
            result.append(
                {
                    "model_name": model.model_name,
                    "display_name": model.display_name,
                    "framework": manifest.framework,
                    "trainer": manifest.name,
                    "task_types": offered,
                    "description": model.description,
                    "parameters": model.parameters,
                    "dataset_formats": manifest.dataset_formats,
                    "supports_resume": manifest.supports_resume,
                }
            )
    return result


def config_schema(manifests: list[TrainerManifest], *, framework: str, task_type: str | None) -> dict[str, Any]:
    """The UI configuration schema of the trainer for `framework` (and task type)."""
    for manifest in manifests:
        if manifest.framework != framework:
            continue
        task = canonical_task(task_type, manifest.task_types) if task_type else None
        if task_type and task is None:
            continue
        metric, mode = default_primary_metric(task or (manifest.task_types[0] if manifest.task_types else ""))
        return {
            "framework": manifest.framework,
            "task_type": task or task_type,
            "trainer": manifest.name,
            "version": manifest.version,
            "schema": manifest.config_schema,
            "primary_metric": metric,
            "primary_metric_mode": mode,
        }
    frameworks = sorted({m.framework for m in manifests})
    raise NotFound(f"framework: no trainer for framework {framework!r}"
                   f"{' and task type ' + repr(task_type) if task_type else ''}; valid frameworks: {_choices(frameworks)}")


def _choices(values: list[str]) -> str:
    return ", ".join(values) if values else "(none installed)"
