"""HTTP adapter of the model catalog (`/api/v1/models`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from visionyard.api.models.service import list_models

# No credential needed: the catalogue is the installed trainers' manifests (no user data), and the
# original frontend's model selector fetches it without a token (ModelSelector.tsx:67).
router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("/list")
async def models_list(request: Request, framework: str | None = None, task_type: str | None = None) -> dict[str, Any]:
    """Models from every installed trainer's capability manifest."""
    manifests = await request.app.state.capabilities.manifests()
    models = list_models(manifests, framework=framework, task_type=task_type)
    return {"models": models, "total": len(models)}
