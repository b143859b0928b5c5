"""FastAPI dependencies: the caller's principal from `Authorization: Bearer`, `X-API-Key` or nothing."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, WebSocket
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth.principal import Principal
from visionyard.api.auth.service import AuthService
from visionyard.api.errors import Unauthorized


def _credential(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return x_api_key or None


async def require_principal(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller's principal, or 401 with a WWW-Authenticate challenge."""
    auth: AuthService = request.app.state.auth
    try:
        return await run_in_threadpool(auth.resolve, _credential(authorization, x_api_key))
    except Unauthorized as refused:
        raise HTTPException(status_code=401, detail=str(refused), headers={"WWW-Authenticate": "Bearer"}) from None


CurrentPrincipal = Annotated[Principal, Depends(require_principal)]


async def resolve_socket_principal(websocket: WebSocket, token: str | None) -> Principal:
    """A WebSocket caller's principal (`?token=`, then the headers); raises Unauthorized."""
    auth: AuthService = websocket.app.state.auth
    credential = token or _credential(websocket.headers.get("authorization"), websocket.headers.get("x-api-key"))
    return await run_in_threadpool(auth.resolve, credential)
