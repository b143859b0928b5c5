"""HTTP adapter of the model catalogue (`/api/v1/models`) and the trainers' UI schemas (`/api/v1/training/config-schema`).

Shapes follow the original platform's frontend: `/models/list` is a bare JSON array.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from visionyard.api.models import service
from visionyard.shared.manifest import TrainerManifest

# No credential needed: the catalogue, the UI schemas and option checks come from the installed trainers'
# manifests (no user data), and the original frontend's training wizard calls them without a token.
catalog = APIRouter(prefix="/api/v1/models", tags=["models"])
schemas = APIRouter(prefix="/api/v1/training", tags=["training"])


async def _manifests(request: Request) -> list[TrainerManifest]:
    manifests: list[TrainerManifest] = await request.app.state.capabilities.manifests()
    return manifests


@catalog.get("/list")
async def models_list(
    request: Request, framework: str | None = None, task_type: str | None = None, supported_only: bool = True
) -> list[dict[str, Any]]:
    """Models from every trainer's capability manifest (a bare array, as the original frontend reads it)."""
    return service.list_models(
        await _manifests(request), framework=framework, task_type=task_type, supported_only=supported_only
    )


@catalog.get("/get")
async def models_get(request: Request, framework: str, model_name: str) -> dict[str, Any]:
    """One model's manifest entry with its framework."""
    return service.model_details(await _manifests(request), framework=framework, model_name=model_name)


@catalog.get("/capabilities/{framework}")
async def framework_capabilities(request: Request, framework: str) -> dict[str, Any]:
    """The framework's manifest in the original `capabilities.json` shape."""
    return service.framework_capabilities(await _manifests(request), framework)


@catalog.get("/{framework}/{model_name:path}/guide")
async def model_guide(request: Request, framework: str, model_name: str) -> dict[str, Any]:
    """The model guide drawer's content (model names may contain `/`)."""
    return service.model_guide(await _manifests(request), framework=framework, model_name=model_name)


@catalog.get("/{framework}/{model_name:path}")
async def model_by_path(request: Request, framework: str, model_name: str) -> dict[str, Any]:
    """One model's manifest entry, addressed by path."""
    return service.model_details(await _manifests(request), framework=framework, model_name=model_name)


@schemas.get("/config-schema")
async def get_config_schema(request: Request, framework: str, task_type: str | None = None) -> dict[str, Any]:
    """The trainer's UI configuration schema: `{framework, task_type, fields[...], presets{...}}`."""
    return service.config_schema(await _manifests(request), framework=framework, task_type=task_type)


@schemas.post("/config/validate")
async def validate_config(
    request: Request, config: Annotated[dict[str, Any], Body()], framework: str | None = None
) -> dict[str, Any]:
    """Advanced options checked against the trainers' declared fields: `{valid, errors, warnings, suggestions}`."""
    return service.validate_advanced_config(await _manifests(request), config, framework=framework)


router = APIRouter()
router.include_router(catalog)
router.include_router(schemas)
