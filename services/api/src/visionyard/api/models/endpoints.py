"""HTTP adapter of the model catalog (`/api/v1/models`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from visionyard.api.auth import require_principal
from visionyard.api.models.service import list_models

router = APIRouter(prefix="/api/v1/models", tags=["models"], dependencies=[Depends(require_principal)])


@router.get("/list")
async def models_list(request: Request, framework: str | None = None, task_type: str | None = None) -> dict[str, Any]:
    """Models from every installed trainer's capability manifest."""
    manifests = await request.app.state.capabilities.manifests()
    models = list_models(manifests, framework=framework, task_type=task_type)
    return {"models": models, "total": len(models)}
