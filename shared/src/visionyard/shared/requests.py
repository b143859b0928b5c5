"""Request-reply payloads on core NATS (`tracker.*`, `storage.*` in `subjects.py`), and the one
fire-and-forget hint beside them (`CheckpointIncoming`).

They are answered at once and never stored in a stream, so unlike commands and events (`messages.py`)
they carry no envelope: no id to de-duplicate, no schema version an old stream could hold. A reply
says `ok` and, when not, an `error` the asker shows as it is.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class TrackerQuery(BaseModel):
    """API → tracker (`tracker.metrics`, `tracker.summary`): metrics or summary of one job's MLflow run."""

    job_id: str


class StageObjectRequest(BaseModel):
    """Runner/API → storage: put a stored object (named by the URI storage issued) into staging."""

    uri: str


class KeepUploadRequest(BaseModel):
    """API → storage: keep an uploaded inference image that the API staged, under its session."""

    session_id: str
    filename: str
    object_name: str
    sha256: str


class KeepUploadReply(BaseModel):
    """Storage → API: where the upload is kept, or why it was refused."""

    ok: bool
    uri: str | None = None
    key: str | None = None
    error: str | None = None


class StageRequest(BaseModel):
    """Runner → storage: put a stored file into the staging object store.

    Either a dataset version (`dataset_id` + `content_hash`) or a job's stored checkpoint
    (`job_id` + `checkpoint_kind`, used to resume a new attempt).
    """

    dataset_id: str | None = None
    content_hash: str | None = None
    job_id: str | None = None
    checkpoint_kind: str | None = None


class StageReply(BaseModel):
    """Storage → runner: where the staged file is, or why it could not be staged."""

    ok: bool
    object_name: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    uri: str | None = None
    epoch: int | None = None
    error: str | None = None


class PresignRequest(BaseModel):
    """API → storage: a download URL for a stored object."""

    uri: str
    expires_in: int = 3600


class PresignReply(BaseModel):
    """Storage → API."""

    ok: bool
    url: str | None = None
    error: str | None = None


class ListImagesRequest(BaseModel):
    """API → storage: a page of one stored dataset version's images (one image when `filename` is set)."""

    dataset_id: str
    content_hash: str
    offset: int = 0
    limit: int = 100
    filename: str | None = None
    expires_in: int = 3600


class ImageEntry(BaseModel):
    """One image of a stored dataset version; `url` is set only where the backend can presign."""

    filename: str
    size: int
    url: str | None = None


class ListImagesReply(BaseModel):
    """Storage → API; `presigned` is False on the local backend (the API serves the bytes itself)."""

    ok: bool
    total_images: int = 0
    images: list[ImageEntry] = Field(default_factory=list)
    presigned: bool = False
    error: str | None = None
    not_found: bool = False


class ReadImageRequest(BaseModel):
    """API → storage: the bytes of one image of a stored dataset version (local backend browsing)."""

    dataset_id: str
    content_hash: str
    filename: str
    max_bytes: int = 700 * 1024
    # Larger images are put into the staging object store (`browse/<hash>/<path>`) and named in the
    # reply instead of refused: a NATS reply cannot carry them (the broker's 1 MB message limit).
    stage_larger: bool = False


class ReadImageReply(BaseModel):
    """Storage → API: base64 bytes (capped under the broker's message size), or why not."""

    ok: bool
    content_b64: str | None = None
    content_type: str | None = None
    size: int | None = None
    error: str | None = None
    not_found: bool = False
    # Set instead of `content_b64` when the image was staged (ReadImageRequest.stage_larger).
    object_name: str | None = None
    sha256: str | None = None


class CheckpointIncoming(BaseModel):
    """Runner → storage (core NATS, no reply, may be lost): a large checkpoint is being staged under
    `object_id`; storage may start copying it while it is put. Only the durable `CheckpointStaged`
    that follows decides whether that copy is kept (same object, same sha256) or thrown away."""

    job_id: str
    attempt: int
    seq: int
    checkpoint_kind: str
    object_name: str
    object_id: str
    size_bytes: int
