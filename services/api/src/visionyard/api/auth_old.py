"""Who is calling: the one dependency every route uses to resolve and authorize a principal."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from visionyard.api.config import ApiSettings


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    subject: str
    is_local: bool = False


LOCAL_PRINCIPAL = Principal(subject="local", is_local=True)


def resolve_principal(token: str | None, settings: ApiSettings) -> Principal:
    """The principal a bearer token / API key stands for; raises PermissionError when refused."""
    if not settings.api_keys:
        if settings.mode == "embedded":
            return LOCAL_PRINCIPAL
        raise PermissionError("authentication is not configured")
    if not token:
        raise PermissionError("missing credentials: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    for key in settings.api_keys:
        # compare_digest: the time taken must not reveal how much of a key matched.
        if hmac.compare_digest(token.encode(), key.encode()):
            return Principal(subject="key:" + hashlib.sha256(key.encode()).hexdigest()[:12])
    raise PermissionError("invalid API key")


def check_project_access(principal: Principal, project_id: str) -> None:
    """Raise PermissionError when `principal` may not use `project_id` (every key may, for now)."""
    del principal, project_id  # the single place to enforce per-project access later


def _token_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


def require_principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    """FastAPI dependency: the caller's principal, or 401."""
    settings: ApiSettings = request.app.state.settings
    try:
        return resolve_principal(_token_from_headers(authorization, x_api_key), settings)
    except PermissionError as refused:
        raise HTTPException(status_code=401, detail=str(refused), headers={"WWW-Authenticate": "Bearer"}) from None


CurrentPrincipal = Annotated[Principal, Depends(require_principal)]


def authorize_project(principal: Principal, project_id: str) -> None:
    """Project access check for a route; 403 when refused."""
    try:
        check_project_access(principal, project_id)
    except PermissionError as refused:
        raise HTTPException(status_code=403, detail=f"project_id: {refused}") from None
