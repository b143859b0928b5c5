"""Access and refresh tokens: HS256 JWTs (PyJWT) with the user id, a type and an expiry.

Access tokens are short-lived and carry no state. Refresh tokens carry the user's `token_version`,
so changing a password (which bumps it) ends every session that could renew itself.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt

ALGORITHM = "HS256"
ISSUER = "visionyard"


class TokenError(Exception):
    """The token is missing, malformed, expired, of the wrong type or signed with another key."""


def issue(secret: str, *, user_id: int, kind: str, lifetime: timedelta, version: int = 0) -> str:
    """A signed token of `kind` ("access" or "refresh") for `user_id`."""
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": str(user_id), "typ": kind, "iat": now, "exp": now + lifetime, "iss": ISSUER,
        "jti": secrets.token_hex(8),
    }
    if kind == "refresh":
        claims["ver"] = version
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, *, kind: str) -> dict[str, Any]:
    """The claims of a valid token of `kind`; raises TokenError otherwise."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], issuer=ISSUER, options={"require": ["exp", "sub", "typ"]}
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.PyJWTError as error:
        raise TokenError(f"invalid token: {error}") from None
    if claims.get("typ") != kind:
        raise TokenError(f"invalid token: a {claims.get('typ')} token where an {kind} token is needed")
    return claims


def embedded_secret(data_dir: Path) -> str:
    """The data directory's own signing key, made on first use (0600), shared by replicas on that directory."""
    path = data_dir / "auth" / "jwt-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting together agree on whichever key was written first.
        with open(path, "x", encoding="ascii", opener=lambda name, flags: os.open(name, flags, 0o600)) as out:
            out.write(secrets.token_urlsafe(48))
    except FileExistsError:
        pass
    return path.read_text(encoding="ascii").strip()


def issue_ticket(secret: str, *, purpose: str, lifetime: timedelta) -> str:
    """A short-lived token good for one purpose only (e.g. "export:17": that package's download link)."""
    now = datetime.now(UTC)
    return jwt.encode({"sub": purpose, "typ": "ticket", "iat": now, "exp": now + lifetime, "iss": ISSUER},
                      secret, algorithm=ALGORITHM)


def check_ticket(secret: str, ticket: str, *, purpose: str) -> bool:
    """Whether `ticket` is a valid, unexpired ticket for exactly `purpose`."""
    try:
        claims = verify(secret, ticket, kind="ticket")
    except TokenError:
        return False
    return claims.get("sub") == purpose
