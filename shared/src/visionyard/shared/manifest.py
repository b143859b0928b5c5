"""Trainer capability manifests: what a trainer can train, as the frontend and the API see it.

A trainer package registers its manifest under the `visionyard.trainers` entry-point group; the
runner publishes the manifests it can run to the `trainer_capabilities` KV bucket, and the API
answers `models/list` and validates new jobs from there.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, Field

ENTRY_POINT_GROUP = "visionyard.trainers"


class ModelInfo(BaseModel):
    """One model a trainer offers."""

    model_config = {"protected_namespaces": ()}

    model_name: str
    display_name: str
    task_types: list[str]
    description: str = ""
    parameters: int | None = None


class TrainerManifest(BaseModel):
    """A trainer's capabilities and how to run it."""

    name: str
    framework: str
    version: str
    module: str = Field(description="python module run as `python -m module` by the runner")
    task_types: list[str]
    models: list[ModelInfo]
    dataset_formats: list[str]
    primary_metric: dict[str, str] = Field(default_factory=dict, description="task type → metric")
    config_schema: dict[str, Any] = Field(default_factory=dict)
    supports_resume: bool = True
    export_module: str | None = Field(default=None, description="module run as `python -m` to export")
    predict_module: str | None = Field(default=None, description="module run as `python -m` to predict")
    export_formats: list[str] = Field(default_factory=list, description="formats `export_module` writes")

    def model_names(self) -> set[str]:
        """Every model name this trainer accepts."""
        return {model.model_name for model in self.models}


def installed_manifests() -> list[TrainerManifest]:
    """The manifests of every trainer installed in this environment."""
    manifests: list[TrainerManifest] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        manifests.append(loaded if isinstance(loaded, TrainerManifest) else TrainerManifest.model_validate(loaded))
    return manifests
