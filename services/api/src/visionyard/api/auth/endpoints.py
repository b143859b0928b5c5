"""HTTP adapter of the account use cases (`/api/v1/auth`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import schemas
from visionyard.api.auth.dependencies import CurrentPrincipal
from visionyard.api.auth.service import AuthService

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


def auth_service(request: Request) -> AuthService:
    """The app's account use cases."""
    service: AuthService = request.app.state.auth
    return service


Service = Annotated[AuthService, Depends(auth_service)]


@router.post("/login", response_model=schemas.TokenResponse)
async def login(
    service: Service, username: Annotated[str, Form(description="the account's email")], password: Annotated[str, Form()]
) -> Any:
    """OAuth2 password form (`username` is the email) → access and refresh tokens."""
    return await run_in_threadpool(service.login, username, password)


@router.post("/refresh", response_model=schemas.TokenResponse)
async def refresh(body: schemas.RefreshRequest, service: Service) -> Any:
    """A refresh token → new access and refresh tokens."""
    return await run_in_threadpool(service.refresh, body.refresh_token)


@router.post("/register", response_model=schemas.UserResponse, status_code=201)
async def register(body: schemas.RegisterRequest, service: Service, request: Request) -> Any:
    """Self-service sign-up, when the deployment allows it (`VISIONYARD_API_OPEN_REGISTRATION`)."""
    if not request.app.state.settings.open_registration:
        raise HTTPException(status_code=403, detail="registration is closed: ask an administrator for an account")
    return await run_in_threadpool(service.register, body)


@router.get("/me", response_model=schemas.UserResponse)
async def me(principal: CurrentPrincipal, service: Service) -> Any:
    """The caller's own account."""
    return await run_in_threadpool(service.me, principal)


@router.put("/me", response_model=schemas.UserResponse)
async def update_me(body: schemas.UpdateMeRequest, principal: CurrentPrincipal, service: Service) -> Any:
    """Change the caller's profile (and password, given the current one)."""
    return await run_in_threadpool(service.update_me, principal, body)


@router.post("/api-keys", response_model=schemas.ApiKeyResponse, status_code=201)
async def create_api_key(body: schemas.CreateApiKeyRequest, principal: CurrentPrincipal, service: Service) -> Any:
    """A machine key scoped to some of the caller's projects; the key is shown in this answer only."""
    return await run_in_threadpool(service.create_api_key, principal, body)


@router.get("/api-keys", response_model=list[schemas.ApiKeyResponse])
async def list_api_keys(principal: CurrentPrincipal, service: Service) -> Any:
    """The caller's API keys."""
    return await run_in_threadpool(service.list_api_keys, principal)


@router.delete("/api-keys/{key_id}", response_model=schemas.ApiKeyResponse)
async def revoke_api_key(key_id: int, principal: CurrentPrincipal, service: Service) -> Any:
    """Revoke one of the caller's API keys."""
    return await run_in_threadpool(service.revoke_api_key, principal, key_id)
