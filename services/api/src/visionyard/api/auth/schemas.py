"""Wire schemas of `/api/v1/auth` (the fields the original frontend reads)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visionyard.api.auth.passwords import MIN_PASSWORD_LENGTH


def _email(value: str) -> str:
    text = value.strip().lower()
    local, _, domain = text.partition("@")
    if not local or not domain or " " in text or len(text) > 320:
        raise ValueError("not an email address")
    return text


class TokenResponse(BaseModel):
    """Tokens after a login or a refresh."""

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int


class RefreshRequest(BaseModel):
    """Body of `POST /auth/refresh`."""

    refresh_token: str = Field(min_length=1)


class UserResponse(BaseModel):
    """A user as the frontend reads it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    full_name: str | None
    company: str | None
    company_custom: str | None = None
    division: str | None
    division_custom: str | None = None
    department: str | None
    phone_number: str | None
    bio: str | None
    badge_color: str | None
    system_role: str
    is_active: bool
    created_at: datetime
    updated_at: datetime


class RegisterRequest(BaseModel):
    """Body of `POST /auth/register` (the frontend's RegisterData; unknown extras are ignored)."""

    model_config = ConfigDict(extra="ignore")

    email: str
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1024)
    full_name: str | None = Field(default=None, max_length=256)
    company: str | None = Field(default=None, max_length=256)
    company_custom: str | None = Field(default=None, max_length=256)
    division: str | None = Field(default=None, max_length=256)
    division_custom: str | None = Field(default=None, max_length=256)
    department: str | None = Field(default=None, max_length=256)
    phone_number: str | None = Field(default=None, max_length=64)
    bio: str | None = Field(default=None, max_length=4000)

    _check_email = field_validator("email")(_email)


class UpdateMeRequest(BaseModel):
    """Body of `PUT /auth/me`: profile fields, and a new password with the current one."""

    model_config = ConfigDict(extra="ignore")

    full_name: str | None = Field(default=None, max_length=256)
    company: str | None = Field(default=None, max_length=256)
    company_custom: str | None = Field(default=None, max_length=256)
    division: str | None = Field(default=None, max_length=256)
    division_custom: str | None = Field(default=None, max_length=256)
    department: str | None = Field(default=None, max_length=256)
    phone_number: str | None = Field(default=None, max_length=64)
    bio: str | None = Field(default=None, max_length=4000)
    badge_color: str | None = Field(default=None, max_length=32)
    current_password: str | None = None
    new_password: str | None = Field(default=None, min_length=MIN_PASSWORD_LENGTH, max_length=1024)


class CreateApiKeyRequest(BaseModel):
    """Body of `POST /auth/api-keys`: a machine key for some of the caller's projects."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    project_ids: list[int] = Field(min_length=1, description="projects the key may act in (the caller's own)")
    read_only: bool = False


class ApiKeyResponse(BaseModel):
    """An API key's record; `key` only in the answer that created it."""

    id: int
    name: str
    prefix: str
    project_ids: list[int]
    read_only: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    key: str | None = None
