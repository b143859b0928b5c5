"""The scheduling contracts: job priorities and the values kept in the scheduler's KV buckets.

The queue of training jobs lives in JetStream KV, never in a process (docs/scheduling.md):

- `sched_requests[<job_id>]` (`QueueRequest`), written by the API through its outbox when an attempt is
  queued (and again when its priority changes): what the job needs and the command to send.
- `sched_jobs[<job_id>]` (`AdmissionRecord`), written only by the elected scheduler with revision checks:
  which attempt of the job was handed to the runners, and whether that attempt has ended.
- `sched_projects[<project_id>]` (`ProjectPolicy`), written by the API: a project's fair-share weight
  and quotas.
- `sched_leader["scheduler"]`, a lease (the bucket's TTL expires it): which API replica decides.
- `sched_status` (`QueueSummary` under `summary`, `PositionShard` under `jobs.<shard>`), written by the
  scheduler: what every waiting job waits for, read by the API's REST and WebSocket routes.

Only the models live here; the policy that orders the queue is the API's (`api/scheduling`).
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visionyard.shared.commands import StartTraining

# Named priorities; any integer in [MIN_PRIORITY, MAX_PRIORITY] is accepted too (higher runs first).
PRIORITY_NAMES: dict[str, int] = {"low": 0, "normal": 50, "high": 100}
NORMAL_PRIORITY = PRIORITY_NAMES["normal"]
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
# The key of the lease in `sched_leader`.
LEADER_KEY = "scheduler"
# Waiting jobs' positions are spread over this many `sched_status` keys (`jobs.<shard>`), so that one
# snapshot value stays far below the server's message size limit and a reader fetches only its shard.
POSITION_SHARDS = 16
SUMMARY_KEY = "summary"

WaitReason = Literal["priority", "capacity", "quota", "no_device", "no_runner", "dispatching"]


def parse_priority(value: Any) -> int:
    """A priority as an integer: `low`, `normal`, `high` or an integer in range; ValueError saying why."""
    if isinstance(value, bool):
        raise ValueError(f"must be low, normal, high or an integer from {MIN_PRIORITY} to {MAX_PRIORITY}")
    if isinstance(value, str):
        named = PRIORITY_NAMES.get(value.strip().lower())
        if named is not None:
            return named
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{value!r} is not low, normal, high or an integer")
        value = int(text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"{value!r} is not low, normal, high or an integer")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(f"{value} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")
    return value


def priority_name(value: int) -> str | None:
    """The name of a named priority (`high` for 100), else None."""
    for name, number in PRIORITY_NAMES.items():
        if number == value:
            return name
    return None


def queue_name(gpus: int) -> str:
    """The queue (device class) a job waits in: `cpu`, or `gpu-<count>`."""
    return "cpu" if gpus <= 0 else f"gpu-{gpus}"


def position_shard(job_id: str) -> str:
    """The `sched_status` key holding a waiting job's position."""
    index = int(job_id) % POSITION_SHARDS if job_id.isdigit() else zlib.crc32(job_id.encode()) % POSITION_SHARDS
    return f"jobs.{index}"


class QueueRequest(BaseModel):
    """A job attempt waiting to be admitted (KV `sched_requests`, key: job id), written by the API."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    attempt: int = Field(ge=1)
    project_id: str
    priority: int = NORMAL_PRIORITY
    # When the attempt was queued (unix seconds): equal priorities keep this order; a priority change keeps it.
    queued_at: float
    gpus: int = Field(default=0, ge=0)
    command: StartTraining
    # The trace context of the request that queued it: the scheduler's admission continues that trace.
    trace: dict[str, str] = Field(default_factory=dict)


class AdmissionRecord(BaseModel):
    """Which attempt of a job the scheduler handed to the runners, and whether it ended (KV `sched_jobs`)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    attempt: int = Field(ge=1)
    project_id: str
    gpus: int = 0
    priority: int = NORMAL_PRIORITY
    state: Literal["admitted", "done"]
    admitted_at: float
    done_at: float | None = None
    subject: str = ""
    scheduler: str = ""


class ProjectPolicy(BaseModel):
    """A project's share of the runners (KV `sched_projects`, key: project id)."""

    model_config = ConfigDict(extra="ignore")

    weight: int = Field(default=1, ge=1, le=1000)
    max_running_jobs: int | None = Field(default=None, ge=0)
    max_gpus: int | None = Field(default=None, ge=0)


class JobPosition(BaseModel):
    """Where one waiting job stands."""

    position: int = Field(description="1: the next job to start; 0: already handed to the runners")
    jobs_ahead: int
    reason: WaitReason
    detail: str
    priority: int
    queue: str
    project_id: str
    estimated_start_seconds: float | None = None


class PositionShard(BaseModel):
    """The positions of the waiting jobs whose id falls in one shard (KV `sched_status`, `jobs.<n>`)."""

    updated_at: float
    jobs: dict[str, JobPosition] = Field(default_factory=dict)


class ProjectQueue(BaseModel):
    """One project's part of one queue."""

    project_id: str
    waiting: int
    running: int
    by_priority: dict[str, int] = Field(default_factory=dict, description="waiting jobs by priority")
    weight: int = 1
    max_running_jobs: int | None = None
    max_gpus: int | None = None
    gpus_in_use: int = 0


class QueueDepth(BaseModel):
    """One queue (device class): its waiting and running jobs by project."""

    queue: str
    waiting: int
    running: int
    projects: list[ProjectQueue] = Field(default_factory=list)


class Capacity(BaseModel):
    """What the live runners offer, as the scheduler counts it."""

    runners: int = 0
    slots: int = 0
    free_slots: int = 0
    gpus: int = 0
    free_gpus: int = 0


class QueueSummary(BaseModel):
    """Every queue's depth (KV `sched_status`, `summary`)."""

    updated_at: float
    scheduler: str
    admitted_per_second: float = 0.0
    capacity: Capacity = Field(default_factory=Capacity)
    queues: list[QueueDepth] = Field(default_factory=list)
