"""Every NATS subject Visionyard uses, defined once.

Commands (`cmd.*`) and events (`evt.*`) are stored in JetStream; request-reply subjects (`storage.*`,
`tracker.*`) are core NATS and are not stored.
"""

from __future__ import annotations

from enum import StrEnum

# Commands (stream COMMANDS, work-queue retention)
CMD_ALL = "cmd.>"
CMD_TRAIN = "cmd.train"
# GPU training commands, by how many GPUs the job needs (devices.py): `cmd.train.gpu.<count>`.
CMD_TRAIN_GPU_PREFIX = "cmd.train.gpu"
CMD_INFER = "cmd.infer"
CMD_EXPORT = "cmd.export"
CMD_DATASET_INGEST = "cmd.dataset.ingest"
# Storage deletes a deleted dataset's stored versions, except those finished jobs pinned.
CMD_DATASET_DELETE = "cmd.dataset.delete"
# Storage deletes uploaded inference images the API no longer needs (a closed test session, a
# deployment request that was answered).
CMD_UPLOAD_DELETE = "cmd.upload.delete"

# A CPU training command the scheduler admitted: `cmd.train.job.<job_id>.<attempt>` (one subject per
# attempt, so the scheduler can publish it "only if no copy is in the stream": api/scheduling).
CMD_TRAIN_JOB_PREFIX = "cmd.train.job"
CMD_TRAIN_JOBS = f"{CMD_TRAIN_JOB_PREFIX}.>"


def train_gpu(count: int | str) -> str:
    """Subject of a training command that needs `count` GPUs (`*` for any count)."""
    return f"{CMD_TRAIN_GPU_PREFIX}.{count}"


def train_gpu_jobs(count: int | str) -> str:
    """Wildcard over the admitted commands of jobs needing `count` GPUs (`*` for any count)."""
    return f"{train_gpu(count)}.>"


def admitted_train(job_id: str, attempt: int | str, *, gpus: int) -> str:
    """Subject of one admitted training attempt: `cmd.train.job.<id>.<attempt>` or `cmd.train.gpu.<n>.<id>.<attempt>`."""
    base = CMD_TRAIN_JOB_PREFIX if gpus <= 0 else train_gpu(gpus)
    return f"{base}.{job_id}.{attempt}"


# Events (stream EVENTS, limits retention): `evt.<entity>.<id>.<kind>`
EVT_ALL = "evt.>"
EVT_JOB_ALL = "evt.job.>"


class Entity(StrEnum):
    """The entity an event is about (its subject's second token); export and inference are `ExportInferenceEvent.family`."""

    JOB = "job"
    DATASET = "dataset"
    EXPORT = "export"
    INFER = "infer"


def job_event(job_id: str, kind: str) -> str:
    """Subject of one job event, e.g. `evt.job.<job_id>.progress`."""
    return f"evt.job.{job_id}.{kind}"


def job_events(job_id: str) -> str:
    """Wildcard over every event of one job."""
    return f"evt.job.{job_id}.>"


def job_event_kind(subject: str) -> str:
    """The kind (last token) of an event subject."""
    return subject.rsplit(".", 1)[-1]


def event_entity(subject: str) -> str:
    """The entity (second token) of an event subject: `job`, `dataset`, `export`, `infer`; "" if not an event."""
    parts = subject.split(".")
    return parts[1] if len(parts) >= 4 and parts[0] == "evt" else ""


def dataset_event(dataset_id: str, kind: str) -> str:
    """Subject of one dataset event, e.g. `evt.dataset.<id>.ready`."""
    return f"evt.dataset.{dataset_id}.{kind}"


def export_inference_event(family: str, job_id: str, kind: str) -> str:
    """Subject of one export or inference job event (`family` an `Entity`), e.g. `evt.export.<id>.completed`."""
    return f"evt.{family}.{job_id}.{kind}"


def export_inference_events(family: str, job_id: str) -> str:
    """Wildcard over every event of one export or inference job."""
    return f"evt.{family}.{job_id}.>"


# Staged export packages and inference results are storage's input from runners.
EVT_EXPORT_STAGED = export_inference_event(Entity.EXPORT, "*", "staged")
EVT_INFER_STAGED = export_inference_event(Entity.INFER, "*", "staged")

# Checkpoint events are the storage service's input from runners.
EVT_JOB_CHECKPOINT = job_event("*", "checkpoint")

# Request-reply (core NATS)
TRACKER_METRICS = "tracker.metrics"
TRACKER_SUMMARY = "tracker.summary"
STORAGE_PRESIGN = "storage.presign"
STORAGE_STAGE = "storage.stage"
# Runner → storage, fire and forget: a large checkpoint is being staged (`requests.CheckpointIncoming`).
STORAGE_CHECKPOINT_INCOMING = "storage.checkpoint_incoming"
# Dataset browsing: a stored version's images (with presigned URLs on S3), and one image's bytes
# for the local backend, which has no URL a browser can fetch.
STORAGE_LIST_IMAGES = "storage.list_images"
STORAGE_READ_IMAGE = "storage.read_image"
# Storage stages a stored object by its URI (inference inputs, export packages served by the API).
STORAGE_STAGE_OBJECT = "storage.stage_object"
# Storage keeps a file the API staged (an uploaded inference image) in its bucket.
STORAGE_KEEP_UPLOAD = "storage.keep_upload"

# Dead letters: `dlq.<consumer>`; kept in the DEADLETTERS stream.
DLQ_ALL = "dlq.>"


def dead_letter(consumer: str) -> str:
    """Subject a poison message is parked on after bounded redelivery."""
    return f"dlq.{consumer}"


def kv_put(bucket: str, key: str) -> str:
    """Raw subject of a JetStream KV put, so an outbox row can write a KV entry durably."""
    return f"$KV.{bucket}.{key}"


def kv_key(bucket: str, subject: str) -> str | None:
    """The key a KV subject of `bucket` holds (the inverse of `kv_put`); None for another bucket's subject."""
    prefix = kv_put(bucket, "")
    return subject[len(prefix):] if subject.startswith(prefix) and len(subject) > len(prefix) else None
