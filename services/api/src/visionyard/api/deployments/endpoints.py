"""HTTP adapter of the deployment use cases: management under `/api/v1/export/deployments` (the export tab's
DeploymentList and CreateDeploymentModal), `GET /api/v1/deployments/{id}` (what the Test button reads) and
the endpoint itself, `POST /api/v1/deployments/{id}/predict`, which takes the deployment's key, not a user's
credential."""

from __future__ import annotations

import base64
import binascii
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from visionyard.api.auth import CurrentPrincipal, Role
from visionyard.api.auth.objects import require_object
from visionyard.api.deployments import schemas
from visionyard.api.deployments.service import DeploymentService
from visionyard.api.errors import InvalidInput, TooLarge, Unauthorized
from visionyard.api.inference.endpoints import MAX_FILE_BYTES, spool_upload
from visionyard.api.inference.service import ReceivedFile

manage = APIRouter(prefix="/api/v1/export/deployments", tags=["deployments"])
router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"])

# A JSON body carries the image base64-encoded: 4/3 of the image limit, plus the other fields.
MAX_JSON_BYTES = MAX_FILE_BYTES * 4 // 3 + 64 * 1024


def deployment_service(request: Request) -> DeploymentService:
    """The app's deployment use cases."""
    service: DeploymentService = request.app.state.deployments
    return service


Service = Annotated[DeploymentService, Depends(deployment_service)]


def _base_url(request: Request) -> str:
    return str(request.base_url)


@manage.get("", response_model=schemas.DeploymentListResponse)
async def list_deployments(
    request: Request, service: Service, principal: CurrentPrincipal, training_job_id: int | None = None,
) -> Any:
    """A training job's deployments (`deployments`), or those of every project the caller is in."""
    if training_job_id is not None:
        await require_object(request, principal, "training", training_job_id, Role.VIEWER, field="training_job_id")
    return await run_in_threadpool(
        service.list_deployments, principal, training_job_id=None if training_job_id is None else str(training_job_id),
        base_url=_base_url(request),
    )


@manage.post("", response_model=schemas.DeploymentResponse, status_code=201)
async def create_deployment(
    body: schemas.CreateDeploymentRequest, request: Request, service: Service, principal: CurrentPrincipal
) -> Any:
    """Deploy a completed export: an endpoint with its own key, or a link to the package."""
    await require_object(request, principal, "export", body.export_job_id, Role.MEMBER, field="export_job_id")
    return await run_in_threadpool(service.create, principal, body, base_url=_base_url(request))


@manage.patch("/{deployment_id}/activate", response_model=schemas.DeploymentResponse)
async def activate(deployment_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Switch a deployment on (its endpoint answers again)."""
    await require_object(request, principal, "deployment", deployment_id, Role.MEMBER, field="deployment_id")
    return await run_in_threadpool(service.set_active, principal, deployment_id, active=True,
                                   base_url=_base_url(request))


@manage.patch("/{deployment_id}/deactivate", response_model=schemas.DeploymentResponse)
async def deactivate(deployment_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Switch a deployment off (its endpoint refuses requests until activated)."""
    await require_object(request, principal, "deployment", deployment_id, Role.MEMBER, field="deployment_id")
    return await run_in_threadpool(service.set_active, principal, deployment_id, active=False,
                                   base_url=_base_url(request))


@manage.delete("/{deployment_id}", response_model=schemas.DeletedDeployment)
async def delete_deployment(deployment_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """Delete a deployment (its key stops working; the export stays)."""
    await require_object(request, principal, "deployment", deployment_id, Role.MEMBER, field="deployment_id")
    return await run_in_threadpool(service.delete, deployment_id)


@router.get("/{deployment_id}", response_model=schemas.DeploymentResponse)
async def get_deployment(deployment_id: int, request: Request, service: Service, principal: CurrentPrincipal) -> Any:
    """One deployment, with `deployment_config.endpoint_url` and (for members and owners) `api_key`."""
    await require_object(request, principal, "deployment", deployment_id, Role.VIEWER, field="deployment_id")
    return await run_in_threadpool(service.get, principal, deployment_id, base_url=_base_url(request))


@router.post(
    "/{deployment_id}/predict", response_model=schemas.PredictResponse,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": schemas.PredictRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"}, "confidence_threshold": {"type": "number"},
            "top_k": {"type": "integer"}}}},
    }}},
)
async def predict(
    deployment_id: int, request: Request, service: Service,
    authorization: Annotated[str | None, Header()] = None,
) -> Any:
    """The deployment's endpoint: `Authorization: Bearer <its api_key>` and an image (JSON base64 `image`, or a
    multipart `file`) → the prediction, once a runner has answered."""
    try:
        served = await run_in_threadpool(service.authorize, deployment_id, authorization)
    except Unauthorized as refused:
        raise HTTPException(status_code=401, detail=str(refused),
                            headers={"WWW-Authenticate": 'Bearer realm="deployment"'}) from None
    scratch = Path(tempfile.mkdtemp(prefix="vy-deploy-"))
    try:
        image, options = await _read_image(request, scratch)
        return await service.predict(served, image, options,
                                     timeout=request.app.state.settings.inference_wait_seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _read_image(request: Request, scratch: Path) -> tuple[ReceivedFile, schemas.PredictRequest]:
    """The posted image on disk and the options, from a JSON body (base64 `image`) or a multipart `file`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("file", "send the image as the multipart field 'file'")
        fields = {key: value for key, value in form.items() if isinstance(value, str) and key != "image"}
        options = _options({**fields, "image": "multipart"})
        return await spool_upload(upload, scratch / "image", field="file"), options
    if content_type not in ("application/json", ""):
        raise InvalidInput("image", f"unsupported content type {content_type!r}; send JSON {{image: <base64>}} "
                                    "or a multipart 'file'")
    if declared and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise TooLarge(f"image: the request is larger than {MAX_JSON_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise TooLarge(f"image: the request is larger than {MAX_JSON_BYTES} bytes")
    try:
        options = schemas.PredictRequest.model_validate_json(bytes(body))
    except ValidationError as error:
        raise InvalidInput(_where(error), str(error.errors()[0].get("msg"))) from None
    encoded = options.image.split(",", 1)[1] if options.image.startswith("data:") else options.image
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image", "not base64 (send the image's bytes base64-encoded, or a data: URL)") from None
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(f"image: larger than {MAX_FILE_BYTES} bytes")
    path = scratch / "image"
    path.write_bytes(data)
    return ReceivedFile(filename="image", path=path), options


def _options(fields: dict[str, Any]) -> schemas.PredictRequest:
    try:
        return schemas.PredictRequest.model_validate(fields)
    except ValidationError as error:
        raise InvalidInput(_where(error), str(error.errors()[0].get("msg"))) from None


def _where(error: ValidationError) -> str:
    return ".".join(str(part) for part in error.errors()[0].get("loc", ())) or "body"
