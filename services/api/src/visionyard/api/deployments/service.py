"""Deployment use cases: make a completed export available, switch it on and off, and serve its endpoint.

A `platform_endpoint` deployment answers `POST <endpoint_url>` with `Authorization: Bearer <its key>`
and an image: the API keeps the image through storage, runs an ordinary single-image inference job
(a runner classifies it with the stored checkpoint the export was made from) and answers when the job
is done. Nothing is served in-process: the endpoint is as scalable, and as slow, as a runner slot (a
warm runner answers in about a second or two; the process start and the torch import dominate).
`download` and `edge_package` deployments hand out a link to the export's package (model, metadata,
a runnable example); `container` is refused: Visionyard builds no container images.

A deployment belongs to its export's project. Its key (keys.py) opens its endpoint and nothing else;
members and owners of the project see it, viewers see the endpoint without the key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from visionyard.api.auth.access import Role, project_filter, role_in
from visionyard.api.auth.principal import Principal
from visionyard.api.db.models import Checkpoint, TrainingJob, utcnow
from visionyard.api.db.models_deployments import Deployment
from visionyard.api.db.models_exports import ExportJob
from visionyard.api.db.session import UnitOfWork
from visionyard.api.deployments import schemas
from visionyard.api.deployments.keys import DeploymentKeys
from visionyard.api.errors import Conflict, InvalidInput, NotFound, Unauthorized
from visionyard.api.inference.schemas import CreateInferenceRequest, InputData, ResultRow
from visionyard.api.inference.service import LONG_TASK_NAMES, InferenceService, ReceivedFile
from visionyard.api.jobstate import JobStatus

OPTIONS: dict[str, type[BaseModel]] = {
    "platform_endpoint": schemas.EndpointOptions,
    "edge_package": schemas.EdgePackageOptions,
    "download": schemas.DownloadOptions,
}
REFUSED_TYPES = {
    "container": "Visionyard builds no container images; deploy as 'download' or 'edge_package' (the package holds "
                 "the model, its metadata and a runnable Python example) or as 'platform_endpoint'",
}
BAD_KEY = "invalid deployment key: send 'Authorization: Bearer <the deployment's api_key>'"


@dataclass(frozen=True)
class Served:
    """What one endpoint request runs: the deployment's training job and its pinned checkpoint."""

    deployment_id: int
    training_job_id: int
    checkpoint_path: str


def _missing(deployment_id: int) -> NotFound:
    return NotFound(f"deployment_id: deployment {deployment_id} not found")


class DeploymentService:
    """The deployment use cases over a unit of work, the keys, the inference use cases and download tickets."""

    def __init__(self, *, uow: UnitOfWork, keys: DeploymentKeys, inference: InferenceService,
                 package_ticket: Callable[[str], str]) -> None:
        self._uow = uow
        self._keys = keys
        self._inference = inference
        self._package_ticket = package_ticket

    # -- managing -----------------------------------------------------------------------------------

    def create(self, principal: Principal, request: schemas.CreateDeploymentRequest, *,
               base_url: str) -> schemas.DeploymentResponse:
        """Deploy a completed export (422 for a type or option Visionyard does not offer, 409 for an unfinished
        export or one whose checkpoint the job has since replaced)."""
        if request.deployment_type in REFUSED_TYPES:
            raise InvalidInput("deployment_type", REFUSED_TYPES[request.deployment_type])
        try:
            options = OPTIONS[request.deployment_type].model_validate(request.deployment_config)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem.get("loc", ())) or "deployment_config"
            raise InvalidInput(f"deployment_config.{where}", str(problem.get("msg"))) from None
        with self._uow.transaction() as session:
            export = session.get(ExportJob, str(request.export_job_id))
            if export is None:
                raise NotFound(f"export_job_id: export {request.export_job_id} not found")
            if export.status != JobStatus.COMPLETED:
                raise Conflict(f"export_job_id: export {export.id} is not completed: status is {export.status}")
            pinned = _current_checkpoint_sha(session, export)
            if export.checkpoint_sha256 and pinned != export.checkpoint_sha256:
                raise Conflict(f"export_job_id: training job {export.training_job_id}'s {export.checkpoint_kind} "
                               f"checkpoint changed after export {export.id} was made (it was trained again); "
                               "export it again and deploy that export")
            endpoint = request.deployment_type == "platform_endpoint"
            active = not endpoint or bool(getattr(options, "auto_activate", True))
            now = utcnow()
            row = Deployment(
                project_id=export.project_id, export_job_id=export.id, training_job_id=export.training_job_id,
                deployment_type=request.deployment_type, status="active" if active else "inactive",
                config=options.model_dump(), key_salt=self._keys.new_salt() if endpoint else None,
                checkpoint_kind=export.checkpoint_kind, checkpoint_sha256=export.checkpoint_sha256 or pinned,
                request_count=0, total_inference_time_ms=0.0, total_latency_ms=0.0, created_at=now,
                activated_at=now if active else None,
            )
            session.add(row)
            session.flush()
            return self._response(session, row, principal=principal, base_url=base_url)

    def list_deployments(self, principal: Principal, *, training_job_id: str | None,
                         base_url: str) -> schemas.DeploymentListResponse:
        """Deployments of a training job (access checked by the caller), or of every project the caller sees."""
        with self._uow.read() as session:
            query = select(Deployment).order_by(Deployment.id.desc())
            if training_job_id is not None:
                if session.get(TrainingJob, training_job_id) is None:
                    raise NotFound(f"training_job_id: training job {training_job_id} not found")
                query = query.where(Deployment.training_job_id == training_job_id)
            else:
                visible = project_filter(session, principal)
                if visible is not None:
                    query = query.where(Deployment.project_id.in_(visible))
            rows = session.scalars(query).all()
            listed = [self._response(session, row, principal=principal, base_url=base_url) for row in rows]
            return schemas.DeploymentListResponse(total=len(listed), deployments=listed)

    def get(self, principal: Principal, deployment_id: int, *, base_url: str) -> schemas.DeploymentResponse:
        """One deployment (its key for members and owners)."""
        with self._uow.read() as session:
            row = session.get(Deployment, deployment_id)
            if row is None:
                raise _missing(deployment_id)
            return self._response(session, row, principal=principal, base_url=base_url)

    def set_active(self, principal: Principal, deployment_id: int, *, active: bool,
                   base_url: str) -> schemas.DeploymentResponse:
        """Switch a deployment on or off (idempotent); an endpoint whose checkpoint was replaced cannot come on."""
        with self._uow.transaction() as session:
            row = session.get(Deployment, deployment_id)
            if row is None:
                raise _missing(deployment_id)
            if active and row.status != "active":
                if row.deployment_type == "platform_endpoint":
                    _require_pinned_checkpoint(session, row)
                row.status, row.activated_at, row.deactivated_at, row.error_message = "active", utcnow(), None, None
            elif not active and row.status != "inactive":
                row.status, row.deactivated_at = "inactive", utcnow()
            session.flush()
            return self._response(session, row, principal=principal, base_url=base_url)

    def delete(self, deployment_id: int) -> schemas.DeletedDeployment:
        """Delete a deployment: its key stops working at once; the export stays."""
        with self._uow.transaction() as session:
            row = session.get(Deployment, deployment_id)
            if row is None:
                raise _missing(deployment_id)
            session.delete(row)
        return schemas.DeletedDeployment(status="success", deployment_id=deployment_id,
                                         message=f"deployment {deployment_id} deleted; its key no longer works")

    # -- the endpoint -------------------------------------------------------------------------------

    def authorize(self, deployment_id: int, authorization: str | None) -> Served:
        """What a request to this deployment's endpoint may run: 401 for a missing or wrong key (another
        deployment's included), 409 for an inactive deployment or one whose checkpoint was replaced."""
        key = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else ""
        if not key or self._keys.deployment_of(key) != deployment_id:
            raise Unauthorized(BAD_KEY)
        with self._uow.read() as session:
            row = session.get(Deployment, deployment_id)
            if row is None or not self._keys.matches(key, row.id, row.key_salt):
                raise Unauthorized(BAD_KEY)
            if row.status != "active":
                raise Conflict(f"deployment {row.id} is {row.status}: activate it to serve predictions")
            export = _require_pinned_checkpoint(session, row)
            return Served(deployment_id=row.id, training_job_id=int(row.training_job_id),
                          checkpoint_path=export.checkpoint_path or row.checkpoint_kind)

    async def predict(self, served: Served, image: ReceivedFile, options: schemas.PredictRequest, *,
                      timeout: float) -> schemas.PredictResponse:
        """Run one image through the deployment's model and answer with the prediction (504 past `timeout`)."""
        started = time.monotonic()
        # A session of its own per request: released (storage deletes the image) once answered.
        session_id = f"deployment-{served.deployment_id}-{uuid.uuid4().hex[:16]}"
        try:
            upload = await self._inference.upload_image(image, session_id=session_id, uploaded_by=None, field="image")
            request = CreateInferenceRequest(
                training_job_id=served.training_job_id, checkpoint_path=served.checkpoint_path, inference_type="single",
                input_data=InputData(image_paths_s3=[upload.s3_uri], confidence_threshold=options.confidence_threshold,
                                     iou_threshold=options.iou_threshold, max_detections=options.max_detections,
                                     top_k=options.top_k),
            )
            job, row = await self._inference.run_single(request, timeout=timeout, field="image")
        finally:
            await asyncio.to_thread(self._inference.release_session, session_id, uploaded_by=None, any_uploader=True)
        latency_ms = (time.monotonic() - started) * 1000.0
        model_ms = float(row.inference_time_ms or 0.0)
        await asyncio.to_thread(self._count_request, served.deployment_id, model_ms=model_ms, latency_ms=latency_ms)
        return _prediction(served.deployment_id, job.id, LONG_TASK_NAMES.get(job.task_type, job.task_type), row,
                           latency_ms=latency_ms)

    def _count_request(self, deployment_id: int, *, model_ms: float, latency_ms: float) -> None:
        with self._uow.transaction() as session:
            # One statement: concurrent requests on other replicas add up instead of overwriting.
            session.execute(update(Deployment).where(Deployment.id == deployment_id).values(
                request_count=Deployment.request_count + 1,
                total_inference_time_ms=Deployment.total_inference_time_ms + model_ms,
                total_latency_ms=Deployment.total_latency_ms + latency_ms, last_request_at=utcnow(),
            ))

    # -- shapes -------------------------------------------------------------------------------------

    def _response(self, session: Session, row: Deployment, *, principal: Principal,
                  base_url: str) -> schemas.DeploymentResponse:
        export = session.get(ExportJob, row.export_job_id)
        job = session.get(TrainingJob, row.training_job_id)
        base = base_url.rstrip("/")
        config: dict[str, Any] = dict(row.config or {})
        if row.deployment_type == "platform_endpoint":
            role = role_in(session, principal, row.project_id)
            shown = role is not None and role >= Role.MEMBER and row.key_salt is not None
            config.update(
                endpoint_url=f"{base}/api/v1/deployments/{row.id}/predict",
                api_key=self._keys.key(row.id, row.key_salt) if shown and row.key_salt else None,
                api_key_visible=shown,
                request_format="POST JSON {image: <base64>, confidence_threshold?, top_k?} or multipart 'file', "
                               "with 'Authorization: Bearer <api_key>'",
            )
        else:
            # The API serves the package for a ticket (a browser link carries no header): a fresh one each read.
            link = f"{base}/api/v1/export/{row.export_job_id}/package?ticket={self._package_ticket(row.export_job_id)}"
            config.update(download_url=link, link_expires_in=3600)
            if row.deployment_type == "edge_package":
                config.update(package_url=link,
                              note="the export's package as it is (model, metadata, runnable example); "
                                   "no further optimization is applied")
        count = row.request_count or 0
        return schemas.DeploymentResponse(
            id=row.id, export_job_id=int(row.export_job_id), training_job_id=int(row.training_job_id),
            project_id=int(row.project_id) if row.project_id.isdigit() else None, deployment_type=row.deployment_type,
            status=row.status, deployment_config=config, export_format=export.export_format if export else None,
            task_type=LONG_TASK_NAMES.get(job.task_type, job.task_type) if job else None,
            checkpoint_kind=row.checkpoint_kind, created_at=row.created_at, activated_at=row.activated_at,
            deactivated_at=row.deactivated_at, error_message=row.error_message,
            usage_stats=schemas.UsageStats(
                request_count=count, total_inference_time_ms=round(row.total_inference_time_ms or 0.0, 3),
                avg_latency_ms=round((row.total_latency_ms or 0.0) / count, 3) if count else 0.0,
                avg_inference_time_ms=round((row.total_inference_time_ms or 0.0) / count, 3) if count else 0.0,
                last_request_at=row.last_request_at,
            ),
        )


def _current_checkpoint_sha(session: Session, export: ExportJob) -> str | None:
    stored = session.scalars(select(Checkpoint).where(Checkpoint.job_id == export.training_job_id,
                                                      Checkpoint.kind == export.checkpoint_kind)).first()
    return stored.sha256 if stored is not None and stored.status == "stored" else None


def _require_pinned_checkpoint(session: Session, row: Deployment) -> ExportJob:
    """The deployment's export, when the job still stores the very checkpoint the deployment serves."""
    export = session.get(ExportJob, row.export_job_id)
    if export is None or export.status != JobStatus.COMPLETED:
        raise Conflict(f"deployment {row.id}: its export {row.export_job_id} is no longer completed")
    current = _current_checkpoint_sha(session, export)
    if current is None or current != row.checkpoint_sha256:
        raise Conflict(f"deployment {row.id}: training job {row.training_job_id}'s {row.checkpoint_kind} checkpoint "
                       "is not the one this deployment was made from (the job was trained again, or it is not stored); "
                       "export and deploy again")
    return export


def _prediction(deployment_id: int, inference_job_id: int, task_type: str, row: ResultRow, *,
                latency_ms: float) -> schemas.PredictResponse:
    detections = [
        schemas.Detection(
            class_id=int(box.get("class_id", 0)), class_name=box.get("label") or box.get("class_name"),
            confidence=float(box.get("confidence", 0.0)),
            bbox=schemas.BoundingBox(x1=float(box["x1"]), y1=float(box["y1"]), x2=float(box["x2"]), y2=float(box["y2"])),
        )
        for box in row.predicted_boxes or [] if isinstance(box, dict) and {"x1", "y1", "x2", "y2"} <= set(box)
    ]
    top = None
    if row.predicted_boxes is None and row.predicted_label is not None and row.predicted_label_id is not None:
        top = schemas.ClassificationResult(class_id=row.predicted_label_id, class_name=row.predicted_label,
                                           confidence=float(row.confidence or 0.0))
    return schemas.PredictResponse(
        deployment_id=deployment_id, inference_job_id=inference_job_id, task_type=task_type,
        inference_time_ms=float(row.inference_time_ms or 0.0), latency_ms=round(latency_ms, 3),
        classification_result=top, top5_predictions=list(row.top5_predictions), detections=detections,
    )
