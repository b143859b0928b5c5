"""Each service's NATS user and permissions, derived from the contracts so they cannot drift from them.

`ACCESS` says, in the contracts' own terms, what each service does on the bus: the messages it
publishes (their classes: the subjects follow from them), the durable consumers it pulls from
(`streams.CONSUMERS`), the request subjects it asks and answers, the KV buckets it writes or only
reads, whether it uses the staging object store, and which streams it reads directly. `grants()`
turns that into nats-server publish/subscribe allow and deny lists, JetStream API subjects included;
`server_authorization()` renders the `authorization` block of a nats-server configuration. `visionyard
up` generates its server's configuration from it; `deploy/nats/` holds the production rendering
(`python -m visionyard.shared.permissions`), checked against this module by a test.

Each service also declares only its own part of the topology (`Bus.ensure_topology` with a user): the
streams it publishes into or reads, its own consumers, the KV buckets and object store it uses. A
service may therefore create or update those streams with the configuration in `streams.py`, but it
can neither publish a subject it does not produce, nor pull, acknowledge, create or delete another
service's consumer, nor write a KV bucket it only reads. Request replies go to a per-user inbox prefix
(`_INBOX_<user>`), so no user can subscribe to another's replies; responders answer through
`allow_responses` (only to the reply subject of a request they received).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from visionyard.shared import commands, events, streams, subjects
from visionyard.shared.devices import MAX_GPUS_PER_JOB
from visionyard.shared.messages import Message

JS_API = "$JS.API"
ADMIN_USER = "admin"


@dataclass(frozen=True)
class ServiceAccess:
    """What one service does on NATS, in the contracts' terms."""

    user: str
    publishes: tuple[type[Message], ...] = ()
    consumers: tuple[streams.ConsumerSpec, ...] = ()
    requests: tuple[str, ...] = ()
    serves: tuple[str, ...] = ()
    notifies: tuple[str, ...] = ()
    listens: tuple[str, ...] = ()
    kv_writes: tuple[str, ...] = ()
    kv_reads: tuple[str, ...] = ()
    kv_watches: tuple[str, ...] = ()
    # Buckets whose old delete markers it purges (`KeyValue.purge_deletes`).
    kv_purges: tuple[str, ...] = ()
    object_store: bool = False
    # Streams read directly, outside a durable consumer (an ordered consumer, a last-message lookup).
    reads_streams: tuple[streams.StreamSpec, ...] = ()
    # Subjects published beside the messages' own (a message sent on another subject than its class's).
    also_publishes: tuple[str, ...] = ()
    # Durable consumers it may use but declares only when it serves them (the runners' GPU consumers).
    also_consumes: tuple[streams.ConsumerSpec, ...] = ()

    @property
    def inbox_prefix(self) -> str:
        """The prefix of this user's reply subjects."""
        return f"_INBOX_{self.user}"


_EXPORT_EVENTS = (events.ExportStarted, events.ExportProgress, events.ExportPackageStaged, events.ExportCompleted,
                  events.ExportFailed, events.ExportCancelled)
_INFER_EVENTS = (events.InferenceStarted, events.InferenceProgress, events.InferenceResultsStaged,
                 events.InferenceCompleted, events.InferenceFailed, events.InferenceCancelled)

API = ServiceAccess(
    user="api",
    publishes=(
        commands.StartTraining, commands.StartExport, commands.StartInference, commands.IngestDataset,
        commands.DeleteDataset, commands.DeleteUploads,
        events.JobQueued, events.JobCancelRequested, events.JobCancelled, events.ExportStatusChanged,
        # The HTTP callback ingress of the original trainers turns their reports into these.
        events.ProgressReported, events.LogEmitted, events.JobCompleted, events.JobFailed,
    ),
    # A GPU job's StartTraining goes to `cmd.train.gpu.<count>` (devices.py); the scheduler an API replica
    # runs sends admitted attempts to `cmd.train.job.<id>.<attempt>` / `cmd.train.gpu.<count>.<id>.<attempt>`.
    also_publishes=(subjects.train_gpu("*"), subjects.CMD_TRAIN_JOBS, subjects.train_gpu_jobs("*")),
    consumers=(streams.API_PROJECTOR, streams.API_SCHEDULER),
    requests=(subjects.TRACKER_METRICS, subjects.TRACKER_SUMMARY, subjects.STORAGE_PRESIGN,
              subjects.STORAGE_STAGE_OBJECT, subjects.STORAGE_KEEP_UPLOAD, subjects.STORAGE_LIST_IMAGES,
              subjects.STORAGE_READ_IMAGE),
    kv_writes=(streams.KV_CANCELLATIONS, streams.KV_JOB_TERMINAL, streams.KV_SCHED_REQUESTS, streams.KV_SCHED_JOBS,
               streams.KV_SCHED_PROJECTS, streams.KV_SCHED_LEADER, streams.KV_SCHED_STATUS),
    kv_reads=(streams.KV_CAPABILITIES, streams.KV_RUNNER_DEVICES),
    # The scheduler mirrors the queue, the admissions, the projects' policies and the runners' devices;
    # the WebSocket follows where waiting jobs stand.
    kv_watches=(streams.KV_SCHED_REQUESTS, streams.KV_SCHED_JOBS, streams.KV_SCHED_PROJECTS,
                streams.KV_RUNNER_DEVICES, streams.KV_SCHED_STATUS),
    kv_purges=(streams.KV_SCHED_REQUESTS, streams.KV_SCHED_JOBS),
    object_store=True,
    # The live WebSocket feed (an ordered consumer per job); the scheduler's look-up of a job's last events.
    reads_streams=(streams.EVENTS,),
)
RUNNER = ServiceAccess(
    user="runner",
    publishes=(
        events.JobStarted, events.ProgressReported, events.LogEmitted, events.CheckpointStaged,
        events.JobCompleted, events.JobFailed, events.JobCancelled, *_EXPORT_EVENTS, *_INFER_EVENTS,
    ),
    consumers=(streams.RUNNER,),
    also_consumes=tuple(streams.runner_gpu(count) for count in range(1, MAX_GPUS_PER_JOB + 1)),
    requests=(subjects.STORAGE_STAGE, subjects.STORAGE_STAGE_OBJECT),
    notifies=(subjects.STORAGE_CHECKPOINT_INCOMING,),
    kv_writes=(streams.KV_CAPABILITIES, streams.KV_RUNNER_DEVICES),
    kv_reads=(streams.KV_CANCELLATIONS, streams.KV_JOB_TERMINAL),
    kv_watches=(streams.KV_CANCELLATIONS,),
    object_store=True,
)
TRACKER = ServiceAccess(
    user="tracker",
    publishes=(events.JobTracked,),
    consumers=(streams.TRACKER,),
    serves=(subjects.TRACKER_METRICS, subjects.TRACKER_SUMMARY),
    reads_streams=(streams.EVENTS,),  # the last `started` event of a job (its parameters)
)
STORAGE = ServiceAccess(
    user="storage",
    publishes=(events.ArtifactStored, events.DatasetReady, events.DatasetRejected, events.DatasetDeleted,
               events.ExportPackageStored, events.InferenceResultsStored),
    consumers=(streams.STORAGE_ARTIFACTS, streams.STORAGE_INGEST, streams.STORAGE_SHIPPED,
               streams.STORAGE_DATASET_DELETE, streams.STORAGE_UPLOAD_DELETE),
    serves=(subjects.STORAGE_STAGE, subjects.STORAGE_PRESIGN, subjects.STORAGE_LIST_IMAGES,
            subjects.STORAGE_READ_IMAGE, subjects.STORAGE_STAGE_OBJECT, subjects.STORAGE_KEEP_UPLOAD),
    listens=(subjects.STORAGE_CHECKPOINT_INCOMING,),
    object_store=True,
)
ACCESS: dict[str, ServiceAccess] = {access.user: access for access in (API, RUNNER, TRACKER, STORAGE)}


def message_subject(cls: type[Message]) -> str:
    """The subject pattern a message class is published on (`*` for its id token)."""
    if issubclass(cls, events.JobEvent):
        return subjects.job_event("*", cls.kind)
    if issubclass(cls, events.ExportInferenceEvent):
        return subjects.export_inference_event(cls.family, "*", cls.kind)
    if issubclass(cls, events.DatasetEvent):
        return subjects.dataset_event("*", cls.kind)
    subject = getattr(cls, "subject", None)
    if isinstance(subject, str):
        return subject
    raise TypeError(f"{cls.__name__}: no subject pattern known")


def _stream_of(subject: str) -> streams.StreamSpec:
    for spec in streams.STREAMS:
        for pattern in spec.subjects:
            if subject_matches(pattern, subject):
                return spec
    raise ValueError(f"no stream stores {subject}")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS `pattern` (with `*` and `>`) covers every subject `subject` (itself a pattern) covers."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have):
            return False
        if token != "*" and token != have[index]:
            return False
        if token == "*" and have[index] == ">":
            return False
    return len(want) == len(have)


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    """The stream behind an object store bucket."""
    return f"OBJ_{bucket}"


def declared_streams(access: ServiceAccess) -> tuple[streams.StreamSpec, ...]:
    """The streams a service declares at start-up: those it publishes into, consumes from or reads."""
    used = {_stream_of(message_subject(cls)).name for cls in access.publishes}
    used |= {_stream_of(subject).name for subject in access.also_publishes}
    used |= {consumer.stream for consumer in (*access.consumers, *access.also_consumes)}
    used |= {spec.name for spec in access.reads_streams}
    if access.consumers:
        used.add(streams.DEADLETTERS.name)  # a poison message is parked there
    return tuple(spec for spec in streams.STREAMS if spec.name in used)


def kv_buckets(access: ServiceAccess) -> tuple[str, ...]:
    """The KV buckets a service uses (and may create, empty, if it comes up first)."""
    used = set(access.kv_writes) | set(access.kv_reads) | set(access.kv_watches)
    return tuple(bucket for bucket in streams.KV_BUCKETS if bucket in used)


@dataclass(frozen=True)
class Grants:
    """nats-server permissions of one user."""

    user: str
    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    allow_responses: bool

    def as_config(self) -> dict[str, object]:
        """The `permissions` map of a nats-server user."""
        publish: dict[str, object] = {"allow": list(self.publish_allow)}
        if self.publish_deny:
            publish["deny"] = list(self.publish_deny)
        permissions: dict[str, object] = {"publish": publish, "subscribe": {"allow": list(self.subscribe_allow)}}
        if self.allow_responses:
            permissions["allow_responses"] = True
        return permissions


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _stream_read(stream: str) -> list[str]:
    # Reading a stream outside a durable: its info, single messages (direct or through the API) and
    # ordered (ephemeral, flow-controlled) consumers.
    return [f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>", *_ordered_consumer(stream)]


def _ordered_consumer(stream: str) -> list[str]:
    # Created without a name (the server then refuses a durable name); nats-py looks its info up by the
    # name the server gave it, which cannot be granted ahead of time: info is read-only.
    return [f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>"]


def grants(access: ServiceAccess) -> Grants:
    """The publish/subscribe permissions that let `access` do exactly what it says."""
    publish = [f"{JS_API}.STREAM.NAMES"]
    deny: list[str] = []
    for spec in declared_streams(access):
        publish += [f"{JS_API}.STREAM.CREATE.{spec.name}", f"{JS_API}.STREAM.UPDATE.{spec.name}",
                    f"{JS_API}.STREAM.INFO.{spec.name}"]
    publish += [message_subject(cls) for cls in access.publishes]
    publish += list(access.also_publishes)
    for consumer in (*access.consumers, *access.also_consumes):
        base = f"{consumer.stream}.{consumer.durable}"
        publish += [f"{JS_API}.CONSUMER.CREATE.{base}", f"{JS_API}.CONSUMER.CREATE.{base}.>",
                    f"{JS_API}.CONSUMER.DURABLE.CREATE.{base}", f"{JS_API}.CONSUMER.INFO.{base}",
                    f"{JS_API}.CONSUMER.MSG.NEXT.{base}", f"$JS.ACK.{base}.>",
                    subjects.dead_letter(consumer.durable)]
    for spec in access.reads_streams:
        # `CONSUMER.CREATE.<stream>` (no name) creates ephemeral consumers only: the server refuses a
        # durable name there, so no other service's durable can be made or replaced this way.
        publish += _stream_read(spec.name)
    for bucket in kv_buckets(access):
        stream = kv_stream(bucket)
        publish += [f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.INFO.{stream}",
                    f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}",
                    f"{JS_API}.DIRECT.GET.{stream}.>"]
        if bucket in access.kv_writes:
            publish.append(subjects.kv_put(bucket, ">"))
        if bucket in access.kv_watches:
            publish += _ordered_consumer(stream)
        if bucket in access.kv_purges:
            publish.append(f"{JS_API}.STREAM.PURGE.{stream}")
    if access.object_store:
        stream = object_stream(streams.OBJECT_STAGING)
        publish += [f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.INFO.{stream}",
                    f"{JS_API}.STREAM.PURGE.{stream}", f"{JS_API}.STREAM.MSG.GET.{stream}",
                    f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>",
                    # Readers pull an object's chunks through a consumer of their own (`read-<uuid>`).
                    f"{JS_API}.CONSUMER.CREATE.{stream}.>", f"{JS_API}.CONSUMER.INFO.{stream}.>",
                    f"{JS_API}.CONSUMER.DELETE.{stream}.>", f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.>",
                    f"$O.{streams.OBJECT_STAGING}.>"]
    publish += list(access.requests) + list(access.notifies)
    subscribe = [f"{access.inbox_prefix}.>", *access.serves, *access.listens]
    return Grants(user=access.user, publish_allow=_unique(publish), publish_deny=_unique(deny),
                  subscribe_allow=_unique(subscribe), allow_responses=bool(access.serves))


def server_authorization(passwords: dict[str, str], *, admin: bool = True) -> str:
    """The `authorization { users = [...] }` block of a nats-server configuration.

    `passwords` maps each user (the services', and `admin` when `admin`) to its password, or to a
    `$VARIABLE` that nats-server resolves from its environment (production). `admin` may do anything:
    it is for operators and the test harness, never handed to a service.
    """
    users = []
    for user, access in ACCESS.items():
        users.append({"user": user, "password": passwords[user], "permissions": grants(access).as_config()})
    if admin:
        users.append({"user": ADMIN_USER, "password": passwords[ADMIN_USER]})
    lines = ["authorization {", "  users = ["]
    for entry in users:
        password = entry["password"]
        rendered = {**entry, "password": password}
        text = json.dumps(rendered, indent=2)
        if isinstance(password, str) and password.startswith("$"):
            # A variable reference, unquoted, so nats-server substitutes it.
            text = text.replace(json.dumps(password), password)
        lines.append("    " + text.replace("\n", "\n    ") + ",")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def production_authorization() -> str:
    """The production rendering: every password read from nats-server's environment."""
    names = {user: f"$VISIONYARD_NATS_{user.upper()}_PASSWORD" for user in [*ACCESS, ADMIN_USER]}
    header = ("# Generated by `python -m visionyard.shared.permissions` from shared/permissions.py: do not edit.\n"
              "# Each password comes from nats-server's environment (VISIONYARD_NATS_<USER>_PASSWORD).\n")
    return header + server_authorization(names)


if __name__ == "__main__":
    print(production_authorization(), end="")
