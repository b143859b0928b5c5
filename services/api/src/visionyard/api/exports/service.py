"""Export use cases: capabilities, create (version, default), list, read, download.

Creating an export writes the export row and its `cmd.export` in one transaction (the outbox), so
the command is published if and only if the export exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.db.models import Checkpoint, TrainingJob, utcnow
from visionyard.api.db.models_deployments import Deployment
from visionyard.api.db.models_exports import ExportJob, InferenceJob
from visionyard.api.db.numbers import next_job_id
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, InvalidInput, NotFound, Unavailable
from visionyard.api.exports import schemas
from visionyard.api.exports.projection import announce_export_status
from visionyard.api.jobstate import JobAction, JobStatus
from visionyard.api.models.service import TASK_ALIASES, CapabilitySource, task_matches
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.shared import streams
from visionyard.shared.commands import CheckpointRef, StartExport
from visionyard.shared.manifest import TrainerManifest

KNOWN_FORMATS = ("onnx", "torchscript", "tensorrt", "openvino", "coreml", "tflite")
UNSUPPORTED_OPTIONS = ("simplify", "fp16", "int8", "embed_preprocessing")


class StoragePort(Protocol):
    """What the export use cases ask storage."""

    async def presign(self, uri: str, *, expires_in: int) -> str:
        """A download URL for a stored object."""
        ...

    async def fetch(self, uri: str, destination: Path) -> Path:
        """The stored object's bytes at `destination` (through the staging object store)."""
        ...


def to_response(export: ExportJob) -> schemas.ExportJobResponse:
    """The API shape of an export row."""
    response = schemas.ExportJobResponse.model_validate(export)
    if export.file_size_bytes is not None:
        response.file_size_mb = round(export.file_size_bytes / (1024 * 1024), 4)
    return response


def resolve_checkpoint(session: Session, job: TrainingJob, checkpoint_path: str | None, *, field: str) -> Checkpoint:
    """The stored checkpoint `checkpoint_path` names: None/'best'/'last' or one of the job's stored URIs."""
    stored = {row.kind: row for row in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))
              if row.status == "stored" and row.uri}
    wanted = checkpoint_path or "best"
    if wanted in stored:
        return stored[wanted]
    for row in stored.values():
        if row.uri == wanted:
            return row
    if wanted == "pretrained":
        raise InvalidInput(field, "'pretrained' is not available: the built-in trainers ship no pretrained weights")
    known = ", ".join(sorted(stored)) or "none"
    raise NotFound(f"{field}: training job {job.id} has no stored checkpoint {wanted!r} (stored: {known})")


def request_cancel(session: Session, row: ExportJob | InferenceJob, *, field: str, what: str) -> str:
    """Record a cancel for an export/inference job; pending → cancelled, running → cancelling; the old status.

    The durable record (KV `job_cancellations`, keyed by the job's id) reaches the runner holding the
    job, or the runner that claims its command later, which then publishes `cancelled`.
    """
    target = jobstate.user_target(row.status, JobAction.CANCEL)
    if target is None:
        raise Conflict(f"{field}: cannot cancel {what} {row.id}: status is {row.status}")
    old = row.status
    OutboxRepository(session).add_kv_put(
        bucket=streams.KV_CANCELLATIONS, key=row.id, value={"attempt": row.attempt},
        message_id=f"cancel-{row.id}-{row.attempt}",
    )
    row.status = target.value
    if target is JobStatus.CANCELLED:
        # No runner shows it started: it is cancelled now; a runner that already holds it confirms later.
        row.completed_at = utcnow()
    return old


def completed_training_job(session: Session, training_job_id: str, *, field: str = "training_job_id") -> TrainingJob:
    """The training job, which must exist (404) and be completed (409)."""
    job = session.get(TrainingJob, training_job_id)
    if job is None:
        raise NotFound(f"{field}: training job {training_job_id} not found")
    if job.status != JobStatus.COMPLETED:
        raise Conflict(f"{field}: training job {training_job_id} is not completed: status is {job.status}")
    return job


def manifest_for(manifests: list[TrainerManifest], *, framework: str, model_name: str | None,
                 task_type: str) -> TrainerManifest | None:
    """The trainer that serves this framework (and model) for this task."""
    for manifest in manifests:
        if manifest.framework != framework:
            continue
        if model_name is not None and model_name not in manifest.model_names():
            continue
        if any(task_matches(task_type, offered) for offered in manifest.task_type_names()):
            return manifest
    return None


class ExportService:
    """The export use cases over a unit of work, the capability manifests and storage."""

    def __init__(self, *, uow: UnitOfWork, capabilities: CapabilitySource, storage: StoragePort) -> None:
        self._uow = uow
        self._capabilities = capabilities
        self._storage = storage

    async def capabilities(
        self, *, training_job_id: str | None, framework: str | None, task_type: str | None
    ) -> schemas.CapabilitiesResponse:
        """Formats the installed trainers can export, for a training job or a framework/task."""
        model_name: str | None = None
        if training_job_id:
            with self._uow.read() as session:
                job = session.get(TrainingJob, training_job_id)
                if job is None:
                    raise NotFound(f"training_job_id: training job {training_job_id} not found")
                framework, task_type, model_name = job.framework, job.task_type, job.model_name
        if not framework or not task_type:
            raise InvalidInput("framework", "give training_job_id, or framework and task_type")
        manifest = manifest_for(await self._capabilities.manifests(), framework=framework, model_name=model_name,
                                task_type=task_type)
        offered = list(manifest.export_formats) if manifest and manifest.export_module else []
        formats = [
            schemas.FormatCapability(
                format=name, supported=name in offered, native_support=name in offered,
                requires_conversion=name not in offered,
                optimization_options=["opset_version", "dynamic_axes"] if name == "onnx" and name in offered else [],
            )
            for name in KNOWN_FORMATS
        ]
        canonical = task_type if task_type not in TASK_ALIASES or task_type.startswith("image_") else TASK_ALIASES[task_type]
        return schemas.CapabilitiesResponse(
            framework=framework, task_type=canonical, supported_formats=formats,
            default_format=offered[0] if offered else None,
        )

    async def create(self, request: schemas.CreateExportRequest) -> schemas.ExportJobResponse:
        """Create a `pending` export and queue `cmd.export`; 404/409/422 name the field."""
        with self._uow.read() as session:
            job = completed_training_job(session, str(request.training_job_id))
            framework, model_name, task_type = job.framework, job.model_name, job.task_type
        manifest = manifest_for(await self._capabilities.manifests(), framework=framework, model_name=model_name,
                                task_type=task_type)
        offered = list(manifest.export_formats) if manifest and manifest.export_module else []
        if request.export_format not in offered:
            raise InvalidInput(
                "export_format",
                f"{request.export_format!r} is not supported for {framework}/{model_name}; "
                f"supported: {', '.join(offered) or 'none'}",
            )
        for option in UNSUPPORTED_OPTIONS:
            if getattr(request.export_config, option):
                raise InvalidInput(f"export_config.{option}", f"{option} is not supported by the {framework} exporter")
        with self._uow.transaction() as session:
            job = completed_training_job(session, str(request.training_job_id))
            checkpoint = resolve_checkpoint(session, job, request.checkpoint_path, field="checkpoint_path")
            version = (session.scalar(select(func.max(ExportJob.version))
                                      .where(ExportJob.training_job_id == job.id)) or 0) + 1
            has_default = session.scalar(select(func.count()).select_from(ExportJob).where(
                ExportJob.training_job_id == job.id, ExportJob.is_default.is_(True))) or 0
            if request.set_as_default:
                session.execute(update(ExportJob).where(ExportJob.training_job_id == job.id).values(is_default=False))
            export = ExportJob(
                id=next_job_id(session, "export"), project_id=job.project_id, training_job_id=job.id,
                export_format=request.export_format, checkpoint_kind=checkpoint.kind, checkpoint_path=checkpoint.uri,
                checkpoint_sha256=checkpoint.sha256, export_config=request.export_config.model_dump(),
                validation_config=request.validation_config.model_dump(),
                version=version, is_default=request.set_as_default or not has_default, status=JobStatus.PENDING.value,
                exporter_done=False, attempt=1, created_at=utcnow(),
            )
            session.add(export)
            OutboxRepository(session).add(StartExport(
                job_id=export.id, attempt=1, training_job_id=job.id, export_format=request.export_format,  # type: ignore[arg-type]
                checkpoint=CheckpointRef(kind=checkpoint.kind, uri=checkpoint.uri or "", sha256=checkpoint.sha256 or "",
                                         epoch=checkpoint.epoch),
                framework=framework, model_name=model_name, task_type=task_type,
                export_config=request.export_config, validation_config=request.validation_config,
            ))
            session.flush()
            return to_response(export)

    def list_for_training_job(self, training_job_id: str) -> schemas.ExportListResponse:
        """Every export of a training job, newest version first."""
        with self._uow.read() as session:
            if session.get(TrainingJob, training_job_id) is None:
                raise NotFound(f"training_job_id: training job {training_job_id} not found")
            rows = session.scalars(select(ExportJob).where(ExportJob.training_job_id == training_job_id)
                                   .order_by(ExportJob.version.desc())).all()
            exports = [to_response(row) for row in rows]
            return schemas.ExportListResponse(training_job_id=int(training_job_id), total=len(rows),
                                              export_jobs=exports, exports=exports)

    def get(self, export_id: str) -> schemas.ExportJobResponse:
        """One export."""
        with self._uow.read() as session:
            return to_response(self._export(session, export_id))

    def cancel(self, export_id: str) -> schemas.ExportJobResponse:
        """pending → cancelled, running → cancelling (the runner confirms); 409 naming a finished status."""
        with self._uow.transaction() as session:
            export = self._export(session, export_id)
            old = request_cancel(session, export, field="export_job_id", what="export")
            announce_export_status(session, export, old=old)
            session.flush()
            return to_response(export)

    def delete(self, export_id: str) -> schemas.DeletedExportResponse:
        """Remove a finished export from the list; an unfinished one must be cancelled first (409)."""
        with self._uow.transaction() as session:
            export = self._export(session, export_id)
            if not jobstate.is_terminal(export.status):
                raise Conflict(f"export_job_id: export {export_id} is {export.status}; cancel it first")
            deployed = session.scalar(select(func.count()).select_from(Deployment)
                                      .where(Deployment.export_job_id == export.id)) or 0
            if deployed:
                raise Conflict(f"export_job_id: export {export_id} has {deployed} deployment(s); delete them first")
            was_default = export.is_default
            training_job_id = export.training_job_id
            session.delete(export)
            session.flush()
            if was_default:
                # Another completed export of the job becomes the default, newest first.
                successor = session.scalars(
                    select(ExportJob).where(ExportJob.training_job_id == training_job_id,
                                            ExportJob.status == JobStatus.COMPLETED.value).order_by(ExportJob.version.desc())
                ).first()
                if successor is not None:
                    successor.is_default = True
            return schemas.DeletedExportResponse(
                message=f"export {export_id} deleted from the list (its stored package is kept: {export.export_path})"
            )

    def _export(self, session: Session, export_id: str) -> ExportJob:
        export = session.get(ExportJob, export_id)
        if export is None:
            raise NotFound(f"export_job_id: export {export_id} not found")
        return export

    def _completed_package(self, export_id: str) -> ExportJob:
        with self._uow.read() as session:
            export = self._export(session, export_id)
            if export.status != JobStatus.COMPLETED or not export.export_path:
                raise Conflict(f"export_job_id: export {export_id} is not completed: status is {export.status}")
            session.expunge(export)
            return export

    async def download(self, export_id: str, *, package_route: str, expires_in: int = 3600) -> schemas.DownloadResponse:
        """A presigned URL; for `file://` (local backend) the API-served package route instead."""
        export = self._completed_package(export_id)
        assert export.export_path is not None
        size_mb = round(export.file_size_bytes / (1024 * 1024), 4) if export.file_size_bytes else None
        if export.export_path.startswith("file://"):
            # A file:// URL only works on the storage host; the API serves the bytes instead.
            return schemas.DownloadResponse(download_url=package_route, file_size_mb=size_mb,
                                            sha256=export.package_sha256)
        try:
            url = await self._storage.presign(export.export_path, expires_in=expires_in)
        except Exception as error:
            raise Unavailable(f"storage could not presign the package: {error}") from error
        return schemas.DownloadResponse(download_url=url, expires_in=expires_in, file_size_mb=size_mb,
                                        sha256=export.package_sha256)

    async def package(self, export_id: str, destination: Path) -> tuple[Path, str]:
        """The package bytes fetched from storage into `destination`, and a filename for them."""
        export = self._completed_package(export_id)
        assert export.export_path is not None
        try:
            path = await self._storage.fetch(export.export_path, destination)
        except Exception as error:
            raise Unavailable(f"storage could not provide the package: {error}") from error
        return path, f"export-{export.training_job_id[:8]}-v{export.version}-{export.export_format}.zip"
