"""Inference use cases: keep uploaded images (through storage), create jobs, read results, and run one
image and wait for its answer (the test panel's quick path and the deployments' endpoint).

Creating a job writes the row and its `cmd.infer` in one transaction (the outbox). A job may only
name images that were uploaded through this API (kept by storage), or a split of the training job's
own dataset version. Releasing a session's images deletes their rows and queues `cmd.upload.delete`
in the same transaction, so storage deletes the files if and only if the API forgot them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import false, func, select
from sqlalchemy.orm import Session

from visionyard.api import jobstate
from visionyard.api.db.models import TrainingJob, utcnow
from visionyard.api.db.models_exports import InferenceJob, InferenceResult, InferenceUpload
from visionyard.api.db.numbers import next_job_id
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import Conflict, GatewayTimeout, InvalidInput, NotFound, Unavailable, UpstreamFailed
from visionyard.api.exports.service import completed_training_job, request_cancel, resolve_checkpoint
from visionyard.api.inference import schemas
from visionyard.api.jobstate import JobStatus
from visionyard.api.outbox.repository import OutboxRepository
from visionyard.shared.commands import CheckpointRef, DatasetRef, DeleteUploads, StartInference
from visionyard.shared.requests import KeepUploadReply

MAX_IMAGES_PER_JOB = 10_000
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
# Storage's own rule for a key segment; the original panel sends `crypto.randomUUID()`.
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# The original panels' names of the task types.
LONG_TASK_NAMES = {"classification": "image_classification", "detection": "object_detection",
                   "segmentation": "instance_segmentation", "pose": "pose_estimation"}


class UploadKeeper(Protocol):
    """Storage's keeping of uploaded files."""

    async def keep_upload(self, *, session_id: str, filename: str, path: Path) -> KeepUploadReply:
        """Stage the file and ask storage to keep it."""
        ...


@dataclass(frozen=True)
class ReceivedFile:
    """An uploaded file spooled to disk by the endpoint."""

    filename: str
    path: Path


def looks_like_image(path: Path) -> bool:
    """Whether the file starts like an image format the trainers read (a cheap first check)."""
    with path.open("rb") as handle:
        head = handle.read(12)
    return any(head.startswith(magic) for magic in IMAGE_MAGIC)


class InferenceService:
    """The inference use cases over a unit of work and storage."""

    def __init__(self, *, uow: UnitOfWork, storage: UploadKeeper) -> None:
        self._uow = uow
        self._storage = storage

    async def upload_images(
        self, files: list[ReceivedFile], *, training_job_id: str | None, uploaded_by: int | None = None
    ) -> schemas.UploadResponse:
        """Keep every file (all must be images: one bad file rejects the request, changing nothing)."""
        if not files:
            raise InvalidInput("files", "no files were uploaded")
        if training_job_id:
            with self._uow.read() as session:
                if session.get(TrainingJob, training_job_id) is None:
                    raise NotFound(f"training_job_id: training job {training_job_id} not found")
        for received in files:
            if not looks_like_image(received.path):
                raise InvalidInput("files", f"{received.filename} is not an image (PNG, JPEG, GIF, BMP, WEBP or TIFF)")
        session_id = uuid.uuid4().hex
        kept = [await self._keep(received, session_id=session_id, field="files") for received in files]
        self._record_uploads(kept, session_id=session_id, training_job_id=training_job_id, uploaded_by=uploaded_by)
        prefix = kept[0].s3_uri.rsplit("/", 1)[0] + "/"
        return schemas.UploadResponse(status="success", inference_session_id=session_id, s3_prefix=prefix,
                                      uploaded_files=kept, total_files=len(kept))

    async def upload_image(
        self, received: ReceivedFile, *, session_id: str, uploaded_by: int | None, field: str = "file"
    ) -> schemas.SingleUploadResponse:
        """Keep one image under the caller's session (the test panel's single-image path)."""
        require_session_id(session_id)
        if not looks_like_image(received.path):
            raise InvalidInput(field, f"{received.filename} is not an image (PNG, JPEG, GIF, BMP, WEBP or TIFF)")
        item = await self._keep(received, session_id=session_id, field=field)
        self._record_uploads([item], session_id=session_id, training_job_id=None, uploaded_by=uploaded_by)
        return schemas.SingleUploadResponse(
            status="success", session_id=session_id, server_path=item.s3_uri, filename=item.unique_filename,
            original_filename=item.original_filename, unique_filename=item.unique_filename, s3_uri=item.s3_uri,
            s3_key=item.s3_key,
        )

    async def _keep(self, received: ReceivedFile, *, session_id: str, field: str) -> schemas.UploadedFile:
        try:
            reply = await self._storage.keep_upload(session_id=session_id, filename=received.filename,
                                                    path=received.path)
        except Exception as error:
            raise Unavailable(f"storage did not keep {received.filename}: {error}") from error
        if not reply.ok or not reply.uri or not reply.key:
            raise InvalidInput(field, reply.error or f"{received.filename} was refused")
        return schemas.UploadedFile(original_filename=received.filename, unique_filename=Path(reply.key).name,
                                    s3_uri=reply.uri, s3_key=reply.key)

    def _record_uploads(self, kept: list[schemas.UploadedFile], *, session_id: str, training_job_id: str | None,
                        uploaded_by: int | None) -> None:
        with self._uow.transaction() as session:
            for item in kept:
                session.add(InferenceUpload(session_id=session_id, training_job_id=training_job_id,
                                            original_filename=item.original_filename,
                                            unique_filename=item.unique_filename, uri=item.s3_uri, key=item.s3_key,
                                            uploaded_by=uploaded_by))

    def release_session(
        self, session_id: str, *, uploaded_by: int | None, any_uploader: bool
    ) -> schemas.SessionDeleted:
        """Forget a session's uploaded images and have storage delete them (the caller's own, or all for an admin).

        Idempotent: an unknown or already released session releases nothing and says so (the original
        panel releases its session whenever it closes, whether or not it uploaded anything).
        """
        require_session_id(session_id)
        with self._uow.transaction() as session:
            query = select(InferenceUpload).where(InferenceUpload.session_id == session_id)
            if not any_uploader:
                query = query.where(InferenceUpload.uploaded_by == uploaded_by) if uploaded_by is not None \
                    else query.where(false())
            rows = session.scalars(query.order_by(InferenceUpload.id)).all()
            keys = [row.key for row in rows]
            for row in rows:
                session.delete(row)
            if keys:
                OutboxRepository(session).add(DeleteUploads(session_id=session_id, keys=keys))
        return schemas.SessionDeleted(status="success", session_id=session_id, deleted_files=len(keys),
                                      message=f"{len(keys)} uploaded image(s) released; storage deletes them")

    async def quick(self, request: schemas.QuickInferenceRequest, *, uploaded_by: int | None, any_uploader: bool,
                    timeout: float) -> schemas.QuickInferenceResponse:
        """Classify one image the caller uploaded with `upload-image`, waiting for the runner's answer."""
        with self._uow.read() as session:
            upload = session.scalars(select(InferenceUpload).where(InferenceUpload.uri == request.image_path)).first()
            own = uploaded_by is not None and upload is not None and upload.uploaded_by == uploaded_by
            mine = upload is not None and (any_uploader or own)
            if not mine:
                raise InvalidInput("image_path", "name an image you uploaded with upload-image (its server_path)")
        create = schemas.CreateInferenceRequest(
            training_job_id=request.training_job_id, checkpoint_path=request.checkpoint_path, inference_type="single",
            input_data=schemas.InputData(image_paths_s3=[request.image_path],
                                         confidence_threshold=request.confidence_threshold,
                                         iou_threshold=request.iou_threshold, max_detections=request.max_detections,
                                         top_k=request.top_k),
        )
        job, row = await self.run_single(create, timeout=timeout, field="image_path")
        return schemas.QuickInferenceResponse(
            **row.model_dump(exclude={"task_type"}), task_type=LONG_TASK_NAMES.get(job.task_type, job.task_type),
            inference_job_id=job.id, training_job_id=job.training_job_id, checkpoint_path=job.checkpoint_path,
            image_path=request.image_path,
        )

    async def run_single(
        self, request: schemas.CreateInferenceRequest, *, timeout: float, field: str
    ) -> tuple[schemas.InferenceJobResponse, schemas.ResultRow]:
        """Create an inference job on one image and wait until a runner has answered it: (job, its one result).

        The job is the ordinary kind (queued through the outbox, run by a runner, its results projected),
        so the wait is on the job's projected status, which any API replica's projector may write. Past
        `timeout` the job is cancelled and the caller gets 504; a failed job gives 502 with its reason.
        """
        created = await asyncio.to_thread(self.create, request)
        job = await self._await_terminal(str(created.id), timeout=timeout)
        if job.status == JobStatus.FAILED:
            raise UpstreamFailed(f"inference job {job.id} failed: {job.error_message}")
        if job.status == JobStatus.CANCELLED:
            raise Conflict(f"inference job {job.id} was cancelled before it answered")
        page = await asyncio.to_thread(self.results, str(job.id), skip=0, limit=1)
        if not page.results:
            raise UpstreamFailed(f"inference job {job.id} completed without a result for the image")
        row = page.results[0]
        if row.error:
            raise InvalidInput(field, row.error)
        return job, row

    async def _await_terminal(self, inference_id: str, *, timeout: float) -> schemas.InferenceJobResponse:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            job = await asyncio.to_thread(self.get, inference_id)
            if jobstate.is_terminal(job.status):
                return job
            if time.monotonic() >= deadline:
                break
            # Short at first (a warm runner answers in about a second), then at most once a second.
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 1.5, 1.0)
        try:
            await asyncio.to_thread(self.cancel, inference_id)
        except Conflict:  # it finished between the last look and the cancel: answer with it
            job = await asyncio.to_thread(self.get, inference_id)
            if jobstate.is_terminal(job.status):
                return job
        raise GatewayTimeout(f"inference job {inference_id} was not answered within {timeout:g} s (no free runner, "
                             "or the runner is slow); it was cancelled")

    def create(self, request: schemas.CreateInferenceRequest) -> schemas.InferenceJobResponse:
        """Create a `pending` inference job and queue `cmd.infer`."""
        data = request.input_data
        with self._uow.transaction() as session:
            job = completed_training_job(session, str(request.training_job_id))
            checkpoint = resolve_checkpoint(session, job, request.checkpoint_path, field="checkpoint_path")
            if isinstance(data.image_paths_s3, str):
                uris = _uploads_under(session, data.image_paths_s3)
                data = data.model_copy(update={"image_paths_s3": uris})
            else:
                uris = list(dict.fromkeys(data.image_paths_s3))
            dataset: DatasetRef | None = None
            if request.inference_type == "dataset":
                if not job.dataset_snapshot_id:
                    raise InvalidInput("inference_type", "the training job has no pinned dataset version")
                dataset = DatasetRef(dataset_id=job.dataset_id, content_hash=job.dataset_snapshot_id)
            else:
                if not uris:
                    raise InvalidInput("input_data.image_paths_s3", "give at least one uploaded image")
                if request.inference_type == "single" and len(uris) != 1:
                    raise InvalidInput("input_data.image_paths_s3", f"a single inference takes 1 image, got {len(uris)}")
                if len(uris) > MAX_IMAGES_PER_JOB:
                    raise InvalidInput("input_data.image_paths_s3", f"at most {MAX_IMAGES_PER_JOB} images per job")
                known = set(session.scalars(select(InferenceUpload.uri).where(InferenceUpload.uri.in_(uris))))
                unknown = [uri for uri in uris if uri not in known]
                if unknown:
                    raise InvalidInput("input_data.image_paths_s3",
                                       f"{unknown[0]} was not uploaded through upload-images")
            inference = InferenceJob(
                id=next_job_id(session, "inference"), project_id=job.project_id, training_job_id=job.id,
                checkpoint_kind=checkpoint.kind, checkpoint_path=checkpoint.uri,
                inference_type=request.inference_type, input_data=data.model_dump(), task_type=job.task_type,
                status=JobStatus.PENDING.value, attempt=1, created_at=utcnow(),
            )
            session.add(inference)
            OutboxRepository(session).add(StartInference(
                job_id=inference.id, attempt=1, training_job_id=job.id,
                checkpoint=CheckpointRef(kind=checkpoint.kind, uri=checkpoint.uri or "", sha256=checkpoint.sha256 or "",
                                         epoch=checkpoint.epoch),
                framework=job.framework, model_name=job.model_name, task_type=job.task_type,
                inference_type=request.inference_type, image_uris=uris if dataset is None else [],
                dataset=dataset, split=(data.dataset_split or "val") if dataset else None,
                top_k=data.top_k, confidence_threshold=data.confidence_threshold,
            ))
            session.flush()
            return schemas.InferenceJobResponse.model_validate(inference)

    def get(self, inference_id: str) -> schemas.InferenceJobResponse:
        """One inference job."""
        with self._uow.read() as session:
            inference = session.get(InferenceJob, inference_id)
            if inference is None:
                raise NotFound(f"inference_job_id: inference job {inference_id} not found")
            return schemas.InferenceJobResponse.model_validate(inference)

    def cancel(self, inference_id: str) -> schemas.InferenceJobResponse:
        """pending → cancelled, running → cancelling (the runner confirms); 409 naming a finished status."""
        with self._uow.transaction() as session:
            inference = session.get(InferenceJob, inference_id)
            if inference is None:
                raise NotFound(f"inference_job_id: inference job {inference_id} not found")
            request_cancel(session, inference, field="inference_job_id", what="inference job")
            session.flush()
            return schemas.InferenceJobResponse.model_validate(inference)

    def list_for_training_job(self, training_job_id: str) -> schemas.InferenceListResponse:
        """Every inference job of a training job, newest first, with totals."""
        with self._uow.read() as session:
            if session.get(TrainingJob, training_job_id) is None:
                raise NotFound(f"training_job_id: training job {training_job_id} not found")
            rows = session.scalars(select(InferenceJob).where(InferenceJob.training_job_id == training_job_id)
                                   .order_by(InferenceJob.created_at.desc())).all()
            jobs = [schemas.InferenceJobResponse.model_validate(row) for row in rows]
        done = [job for job in jobs if job.status == JobStatus.COMPLETED]
        images = sum(job.total_images or 0 for job in done)
        total_ms = sum(job.total_inference_time_ms or 0.0 for job in done)
        return schemas.InferenceListResponse(
            training_job_id=int(training_job_id), total=len(jobs), completed=len(done), total_images=images,
            avg_inference_time_ms=round(total_ms / images, 3) if images else None, jobs=jobs,
        )

    def results(self, inference_id: str, *, skip: int, limit: int) -> schemas.ResultsResponse:
        """A page of per-image results in input order."""
        with self._uow.read() as session:
            inference = session.get(InferenceJob, inference_id)
            if inference is None:
                raise NotFound(f"inference_job_id: inference job {inference_id} not found")
            total = session.scalar(select(func.count()).select_from(InferenceResult)
                                   .where(InferenceResult.inference_job_id == inference_id)) or 0
            rows = session.scalars(select(InferenceResult).where(InferenceResult.inference_job_id == inference_id)
                                   .order_by(InferenceResult.position).offset(skip).limit(limit)).all()
            return schemas.ResultsResponse(
                inference_job_id=int(inference.id), training_job_id=int(inference.training_job_id), total_count=total,
                skip=skip, limit=limit, avg_inference_time_ms=inference.avg_inference_time_ms,
                results=[_result_row(row, inference.task_type) for row in rows],
            )


def require_session_id(session_id: str) -> None:
    """Refuse a session id storage could not use as a key segment (422 naming `session_id`)."""
    if not SESSION_ID.match(session_id):
        raise InvalidInput("session_id", "use 1-64 letters, digits, '-' or '_' (e.g. a UUID)")


def _result_row(row: InferenceResult, task_type: str) -> schemas.ResultRow:
    result = schemas.ResultRow.model_validate(row)
    boxes = result.predicted_boxes
    predictions = list(boxes) if boxes is not None else list(result.top5_predictions)
    return result.model_copy(update={
        "task_type": task_type, "predictions": [_named(prediction) for prediction in predictions],
        "num_detections": len(boxes) if boxes is not None else None,
    })


def _named(prediction: Any) -> Any:
    """A prediction with `class_name` beside its `label` (the original platform's clients read `class_name`)."""
    if isinstance(prediction, dict) and "label" in prediction and "class_name" not in prediction:
        return {**prediction, "class_name": prediction["label"]}
    return prediction


def _uploads_under(session: Session, prefix: str) -> list[str]:
    """The uploaded images under an upload's `s3_prefix` (what the original frontend sends), in upload order."""
    if not prefix.strip():
        raise InvalidInput("input_data.image_paths_s3", "an empty prefix names no uploaded image")
    base = prefix if prefix.endswith("/") else prefix + "/"
    uris = list(session.scalars(
        select(InferenceUpload.uri).where(InferenceUpload.uri.startswith(base, autoescape=True))
        .order_by(InferenceUpload.id)
    ))
    if not uris:
        raise InvalidInput("input_data.image_paths_s3", f"no image was uploaded under {prefix}")
    return list(dict.fromkeys(uris))
