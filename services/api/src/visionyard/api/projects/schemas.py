"""Wire schemas of `/api/v1/projects` (the fields the original frontend reads)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CreateProjectRequest(BaseModel):
    """Body of `POST /projects`."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=4000)
    task_type: str | None = Field(default=None, max_length=64)


class UpdateProjectRequest(BaseModel):
    """Body of `PUT /projects/{id}`: the fields to change."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=4000)
    task_type: str | None = Field(default=None, max_length=64)


class ProjectResponse(BaseModel):
    """A project, with the caller's role in it."""

    id: int
    name: str
    description: str | None
    task_type: str | None
    user_id: int | None = Field(description="the owner's user id")
    user_role: str | None
    experiment_count: int
    dataset_count: int
    member_count: int
    created_at: datetime
    updated_at: datetime


class MemberResponse(BaseModel):
    """A project member."""

    user_id: int
    email: str
    full_name: str | None
    role: str
    is_owner: bool
    badge_color: str | None
    joined_at: datetime


class AddMemberRequest(BaseModel):
    """Body of `POST /projects/{id}/members`: an existing user, by email, and a role."""

    model_config = ConfigDict(extra="ignore")

    email: str = Field(min_length=3, max_length=320)
    role: Literal["member", "viewer", "owner"] = "member"


class DeletedResponse(BaseModel):
    """Answer to a delete."""

    status: str = "success"
    message: str
