"""Every JetStream stream, consumer, KV bucket and object store, declared once.

Each service calls `ensure_topology` at start-up: declaring is idempotent, so any replica of any
service may come up first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nats.js import api

from visionyard.shared import subjects

DAY = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    """One stream."""

    name: str
    subjects: tuple[str, ...]
    retention: api.RetentionPolicy
    max_age: float | None = None
    duplicate_window: float = 120.0


@dataclass(frozen=True)
class ConsumerSpec:
    """One durable pull consumer, shared by all replicas of the service that owns it.

    `max_deliver` bounds redelivery; the last failed delivery is dead-lettered, never dropped.
    `ack_wait` is how long a silent holder keeps a message before JetStream hands it to another.
    """

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    ack_wait: float = 30.0
    max_deliver: int = 20
    max_ack_pending: int = 1000
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    extra: dict[str, object] = field(default_factory=dict)
    # Where a newly created consumer starts: the whole stream, or only what is published from then on.
    deliver_new: bool = False


COMMANDS = StreamSpec(
    name="COMMANDS",
    subjects=(subjects.CMD_ALL,),
    retention=api.RetentionPolicy.WORK_QUEUE,
)
EVENTS = StreamSpec(
    name="EVENTS",
    subjects=(subjects.EVT_ALL,),
    retention=api.RetentionPolicy.LIMITS,
    max_age=7 * DAY,
)
DEADLETTERS = StreamSpec(
    name="DEADLETTERS",
    subjects=(subjects.DLQ_ALL,),
    retention=api.RetentionPolicy.LIMITS,
    max_age=30 * DAY,
)
STREAMS: tuple[StreamSpec, ...] = (COMMANDS, EVENTS, DEADLETTERS)

# The API projects every event into its database.
API_PROJECTOR = ConsumerSpec(
    stream=EVENTS.name,
    durable="api-projector",
    filter_subjects=(subjects.EVT_ALL,),
    ack_wait=30.0,
    max_deliver=50,
)
# The tracker mirrors job events into MLflow; MLflow outages are waited out with backoff.
TRACKER = ConsumerSpec(
    stream=EVENTS.name,
    durable="tracker",
    filter_subjects=(subjects.EVT_JOB_ALL,),
    ack_wait=60.0,
    max_deliver=200,
    backoff_cap=30.0,
)
# Storage keeps staged checkpoints.
STORAGE_ARTIFACTS = ConsumerSpec(
    stream=EVENTS.name,
    durable="storage-artifacts",
    filter_subjects=(subjects.EVT_JOB_CHECKPOINT,),
    ack_wait=120.0,
    max_deliver=200,
)
# Storage ingests dataset uploads.
STORAGE_INGEST = ConsumerSpec(
    stream=COMMANDS.name,
    durable="storage-ingest",
    filter_subjects=(subjects.CMD_DATASET_INGEST,),
    ack_wait=120.0,
    max_deliver=10,
)
# Runners hold a training command unacknowledged (with in-progress heartbeats) while the trainer
# runs; if a runner dies, JetStream redelivers it to another runner after `ack_wait`.
RUNNER = ConsumerSpec(
    stream=COMMANDS.name,
    durable="runner",
    # `cmd.train` itself: commands published straight to the runners (tests, tools, older outbox rows).
    filter_subjects=(subjects.CMD_TRAIN, subjects.CMD_TRAIN_JOBS, subjects.CMD_EXPORT, subjects.CMD_INFER),
    ack_wait=30.0,
    max_deliver=5,
    max_ack_pending=10_000,
)


def runner_gpu(count: int) -> ConsumerSpec:
    """The consumer of GPU training commands needing `count` GPUs (`cmd.train.gpu.<count>`).

    One per count, so a runner pulls only what it can start now: with `k` free GPUs it fetches from
    the consumers of counts `<= k`, and a job needing more stays unclaimed in the stream (not
    redelivered, so waiting costs it no delivery and no attempt). Runners declare the ones they serve.
    """
    return replace(RUNNER, durable=f"runner-gpu-{count}",
                   filter_subjects=(subjects.train_gpu(count), subjects.train_gpu_jobs(count)))


# Storage keeps staged export packages and inference results.
STORAGE_SHIPPED = ConsumerSpec(
    stream=EVENTS.name,
    durable="storage-shipped",
    filter_subjects=(subjects.EVT_EXPORT_STAGED, subjects.EVT_INFER_STAGED),
    ack_wait=120.0,
    max_deliver=200,
)
# Storage deletes the stored versions of deleted datasets (its own consumer: a long ingest on
# `storage-ingest` must not hold a delete back, and an existing server needs no filter change).
STORAGE_DATASET_DELETE = ConsumerSpec(
    stream=COMMANDS.name,
    durable="storage-dataset-delete",
    filter_subjects=(subjects.CMD_DATASET_DELETE,),
    ack_wait=120.0,
    max_deliver=20,
)
# Storage deletes uploaded inference images the API released (its own consumer: small and quick, never
# behind an ingest or a dataset delete).
STORAGE_UPLOAD_DELETE = ConsumerSpec(
    stream=COMMANDS.name,
    durable="storage-upload-delete",
    filter_subjects=(subjects.CMD_UPLOAD_DELETE,),
    ack_wait=60.0,
    max_deliver=20,
)
# The elected scheduler (an API replica) learns from these events when an admitted attempt starts and
# when it ends (its slot and quota are free again). A short ack wait: a replica that lost the lease (or
# died) hands the events it held to the next leader within seconds.
API_SCHEDULER = ConsumerSpec(
    stream=EVENTS.name,
    durable="api-scheduler",
    filter_subjects=(subjects.job_event("*", "started"), subjects.job_event("*", "completed"),
                     subjects.job_event("*", "failed"), subjects.job_event("*", "cancelled")),
    ack_wait=10.0,
    max_deliver=50,
    # Created in an existing deployment, it need not replay days of events of jobs no scheduler admitted.
    deliver_new=True,
)
CONSUMERS: tuple[ConsumerSpec, ...] = (
    API_PROJECTOR,
    TRACKER,
    STORAGE_ARTIFACTS,
    STORAGE_INGEST,
    RUNNER,
    STORAGE_SHIPPED,
    STORAGE_DATASET_DELETE,
    STORAGE_UPLOAD_DELETE,
    API_SCHEDULER,
)

# KV: a cancel is recorded here (durably) so a runner that claims a job later still sees it.
KV_CANCELLATIONS = "job_cancellations"
# KV: each runner publishes the capability manifests of the trainers it can run.
KV_CAPABILITIES = "trainer_capabilities"
# KV: the API records here (via its outbox) the attempt at which a job reached a terminal status, so
# a runner that receives a redelivered command of a finished job acks it instead of "recovering" it.
KV_JOB_TERMINAL = "job_terminal"
# KV: each runner advertises its devices (cpu slots, GPUs, which GPUs are free) under its runner id.
KV_RUNNER_DEVICES = "runner_devices"
# KV, scheduling (shared/scheduling.py, docs/scheduling.md): queued attempts (the API writes), admitted
# attempts (only the elected scheduler writes, revision-checked), project weights and quotas (the API
# writes), the scheduler's lease, and where each waiting job stands (the scheduler writes).
KV_SCHED_REQUESTS = "sched_requests"
KV_SCHED_JOBS = "sched_jobs"
KV_SCHED_PROJECTS = "sched_projects"
KV_SCHED_LEADER = "sched_leader"
KV_SCHED_STATUS = "sched_status"
# The lease expires this long after its holder last renewed it (the bucket's TTL); the holder renews it
# three times per period and stops deciding once a period has passed without a renewal.
SCHED_LEASE_SECONDS = 6.0
KV_BUCKETS: tuple[str, ...] = (KV_CANCELLATIONS, KV_CAPABILITIES, KV_JOB_TERMINAL, KV_RUNNER_DEVICES,
                               KV_SCHED_REQUESTS, KV_SCHED_JOBS, KV_SCHED_PROJECTS, KV_SCHED_LEADER,
                               KV_SCHED_STATUS)
# Buckets whose entries expire (seconds); the others keep their entries until deleted.
KV_TTLS: dict[str, float] = {KV_SCHED_LEADER: SCHED_LEASE_SECONDS}

# Object store: files cross service boundaries here, never inside events.
OBJECT_STAGING = "staging"
OBJECT_STAGING_TTL = 2 * DAY


def with_ack_wait(spec: ConsumerSpec, ack_wait: float) -> ConsumerSpec:
    """`spec` with another ack wait: the consuming service tunes it (tests fail over in seconds)."""
    return replace(spec, ack_wait=ack_wait)


def stream_config(spec: StreamSpec, *, replicas: int) -> api.StreamConfig:
    """The JetStream configuration of one stream."""
    return api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=spec.retention,
        storage=api.StorageType.FILE,
        max_age=spec.max_age,
        duplicate_window=spec.duplicate_window,
        num_replicas=replicas,
    )


def consumer_config(spec: ConsumerSpec) -> api.ConsumerConfig:
    """The JetStream configuration of one durable pull consumer (explicit acks, always)."""
    filters = list(spec.filter_subjects)
    return api.ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.NEW if spec.deliver_new else api.DeliverPolicy.ALL,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )
