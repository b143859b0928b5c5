"""Wire schemas of the queue routes (`/api/v1/queues`, `/api/v1/projects/{id}/scheduling`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ProjectSchedulingRequest(BaseModel):
    """Body of `PUT /projects/{id}/scheduling`: the project's weight and quotas (null: no limit)."""

    model_config = ConfigDict(extra="forbid")

    weight: int = Field(default=1, ge=1, le=1000, description="share of the starts relative to other projects")
    max_running_jobs: int | None = Field(default=None, ge=0, le=100_000,
                                         description="most training jobs of the project running at once")
    max_gpus: int | None = Field(default=None, ge=0, le=100_000, description="most GPUs its running jobs hold")


class ProjectSchedulingResponse(BaseModel):
    """A project's weight and quotas."""

    project_id: int
    weight: int
    max_running_jobs: int | None
    max_gpus: int | None


class ProjectQueueResponse(BaseModel):
    """One project's part of one queue."""

    project_id: int | str
    project_name: str | None
    waiting: int
    running: int
    by_priority: dict[str, int] = Field(description="waiting jobs by priority (named ones by name)")
    weight: int
    max_running_jobs: int | None
    max_gpus: int | None
    gpus_in_use: int


class QueueResponse(BaseModel):
    """One queue: jobs needing the same devices (`cpu`, `gpu-<count>`)."""

    queue: str
    waiting: int
    running: int
    projects: list[ProjectQueueResponse]


class CapacityResponse(BaseModel):
    """What the live runners offer, as the scheduler counts it."""

    runners: int
    slots: int
    free_slots: int
    gpus: int
    free_gpus: int


class QueuesResponse(BaseModel):
    """`GET /queues`: every queue's depth by project and priority (the caller's projects only)."""

    updated_at: datetime | None
    scheduler: str | None = Field(description="the API replica that schedules")
    stale: bool = Field(description="no scheduler has reported for a while")
    admitted_per_second: float
    capacity: CapacityResponse
    queues: list[QueueResponse]


class QueueDepthResponse(BaseModel):
    """`GET /queues/depth`: totals over every project (for autoscalers; no project's data)."""

    waiting: int = Field(description="queued jobs not admitted yet")
    running: int = Field(description="admitted jobs that have not ended")
    slots: int
    free_slots: int
    updated_at: datetime | None
    stale: bool
