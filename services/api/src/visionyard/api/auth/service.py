"""Account use cases: the first admin, login, refresh, sign-up, profile, API keys, and resolving a credential."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from visionyard.api.auth import passwords, schemas, tokens
from visionyard.api.auth.access import role_in
from visionyard.api.auth.principal import Principal
from visionyard.api.db.models import utcnow
from visionyard.api.db.models_access import ApiKey, Project, ProjectMember, User
from visionyard.api.db.session import UnitOfWork
from visionyard.api.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
)

log = logging.getLogger("visionyard.api.auth")

API_KEY_PREFIX = "vy_"
DEFAULT_PROJECT = "Uncategorized"
EMBEDDED_ADMIN_EMAIL = "admin@visionyard.local"


def admin_login_file(data_dir: Path) -> Path:
    """Where embedded mode keeps the generated first admin's login (read by `visionyard up`)."""
    return data_dir / "auth" / "admin-login.json"


def key_digest(key: str) -> str:
    """What is stored of an API key: keys are 256-bit random, so a plain SHA-256 is enough to hide them."""
    return hashlib.sha256(key.encode()).hexdigest()


class AuthService:
    """Users and credentials over the platform database."""

    def __init__(
        self, *, uow: UnitOfWork, secret: str, access_minutes: int, refresh_days: int,
        settings_keys: list[str], anonymous_as_admin: bool,
    ) -> None:
        self._uow = uow
        self._secret = secret
        self._access = timedelta(minutes=access_minutes)
        self._refresh = timedelta(days=refresh_days)
        self._settings_keys = settings_keys
        self._anonymous_as_admin = anonymous_as_admin
        self._admin: tuple[int, str] | None = None

    # -- start-up --------------------------------------------------------------------------------

    def bootstrap(self, *, email: str, password: str, embedded: bool, login_file: Path) -> None:
        """Create the first admin when there is no user yet, and give it the projects nobody owns.

        Embedded mode without `admin_email`/`admin_password` makes `admin@visionyard.local` with a random
        password written to `login_file` (0600), which `visionyard up` prints.
        """
        with self._uow.transaction() as session:
            if session.scalar(select(func.count()).select_from(User)) == 0:
                if not (email and password):
                    if not embedded:
                        raise RuntimeError(
                            "admin_email/admin_password: the database has no user yet; set "
                            "VISIONYARD_API_ADMIN_EMAIL and VISIONYARD_API_ADMIN_PASSWORD to create the first admin"
                        )
                    email, password = EMBEDDED_ADMIN_EMAIL, secrets.token_urlsafe(12)
                    login_file.parent.mkdir(parents=True, exist_ok=True)
                    with open(login_file, "w", encoding="utf-8",
                              opener=lambda name, flags: os.open(name, flags, 0o600)) as out:
                        json.dump({"email": email, "password": password}, out)
                first = User(email=email.strip().lower(), password_hash=passwords.hash_password(password),
                             full_name="Administrator", system_role="admin", is_active=True, token_version=1)
                session.add(first)
                session.flush()
                log.info("created the first admin %s", first.email)
            admin = session.scalars(
                select(User).where(User.system_role == "admin", User.is_active.is_(True)).order_by(User.id)
            ).first()
            if admin is None:
                raise RuntimeError("no active admin user: re-activate one in the database")
            # Projects carried over by the migration (or whose owner was deleted) belong to the first admin.
            for project in session.scalars(select(Project).where(Project.owner_id.is_(None))):
                project.owner_id = admin.id
                _add_member(session, project.id, admin.id, "owner")
            default_project(session, admin.id)
            self._admin = (admin.id, admin.email)

    # -- credentials -----------------------------------------------------------------------------

    def login(self, email: str, password: str) -> schemas.TokenResponse:
        """Tokens for a valid email and password; Unauthorized otherwise (the same message either way)."""
        with self._uow.transaction() as session:
            user = session.scalars(select(User).where(User.email == email.strip().lower())).first()
            if user is None:
                passwords.verify_password(_DUMMY_HASH, password)  # same time whether or not the user exists
                raise Unauthorized("incorrect email or password")
            if not passwords.verify_password(user.password_hash, password):
                raise Unauthorized("incorrect email or password")
            if not user.is_active:
                raise Unauthorized("this account is deactivated")
            if passwords.needs_rehash(user.password_hash):
                user.password_hash = passwords.hash_password(password)
            return self._tokens(user)

    def refresh(self, refresh_token: str) -> schemas.TokenResponse:
        """New tokens for a valid refresh token of an active user whose password has not changed since."""
        try:
            claims = tokens.verify(self._secret, refresh_token, kind="refresh")
        except tokens.TokenError as error:
            raise Unauthorized(f"refresh_token: {error}") from None
        with self._uow.read() as session:
            user = session.get(User, int(claims["sub"]))
            if user is None or not user.is_active or claims.get("ver") != user.token_version:
                raise Unauthorized("refresh_token: no longer valid; log in again")
            return self._tokens(user)

    def _tokens(self, user: User) -> schemas.TokenResponse:
        access = tokens.issue(self._secret, user_id=user.id, kind="access", lifetime=self._access)
        refresh = tokens.issue(self._secret, user_id=user.id, kind="refresh", lifetime=self._refresh,
                               version=user.token_version)
        return schemas.TokenResponse(access_token=access, refresh_token=refresh,
                                     expires_in=int(self._access.total_seconds()))

    def resolve(self, credential: str | None) -> Principal:
        """The principal of a bearer token, an API key, an operator key, or of no credential at all."""
        if not credential:
            if self._anonymous_as_admin and self._admin is not None:
                return Principal(user_id=self._admin[0], email=self._admin[1], is_admin=True, via="anonymous")
            raise Unauthorized("missing credentials: send 'Authorization: Bearer <token or API key>'")
        for key in self._settings_keys:
            # compare_digest: the time taken must not reveal how much of a key matched.
            if hmac.compare_digest(credential.encode(), key.encode()):
                admin_id, admin_email = self._admin or (None, "operator")
                return Principal(user_id=admin_id, email=admin_email, is_admin=True, via="settings_key")
        if credential.startswith(API_KEY_PREFIX):
            return self._resolve_api_key(credential)
        try:
            claims = tokens.verify(self._secret, credential, kind="access")
        except tokens.TokenError as error:
            raise Unauthorized(str(error)) from None
        with self._uow.read() as session:
            user = session.get(User, int(claims["sub"]))
            if user is None or not user.is_active:
                raise Unauthorized("this account no longer exists or is deactivated")
            return Principal(user_id=user.id, email=user.email, is_admin=user.system_role == "admin", via="token")

    def _resolve_api_key(self, credential: str) -> Principal:
        with self._uow.read() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_digest == key_digest(credential))).first()
            if row is None or row.revoked_at is not None:
                raise Unauthorized("invalid or revoked API key")
            user = session.get(User, row.user_id)
            if user is None or not user.is_active:
                raise Unauthorized("the API key's owner is deactivated")
            return Principal(user_id=user.id, email=user.email, is_admin=user.system_role == "admin", via="api_key",
                             key_projects=frozenset(row.project_ids), read_only=row.read_only)

    def download_ticket(self, export_id: str) -> str:
        """A 1-hour link ticket for one export package: browsers open download links without headers."""
        return tokens.issue_ticket(self._secret, purpose=f"export:{export_id}", lifetime=timedelta(hours=1))

    def check_download_ticket(self, ticket: str, export_id: str) -> bool:
        """Whether the ticket opens that export's package."""
        return tokens.check_ticket(self._secret, ticket, purpose=f"export:{export_id}")

    # -- accounts --------------------------------------------------------------------------------

    def register(self, request: schemas.RegisterRequest) -> schemas.UserResponse:
        """A new active user with its own default project."""
        try:
            with self._uow.transaction() as session:
                user = User(email=request.email, password_hash=passwords.hash_password(request.password),
                            full_name=request.full_name, company=request.company_custom or request.company,
                            division=request.division_custom or request.division, department=request.department,
                            phone_number=request.phone_number, bio=request.bio, system_role="user",
                            is_active=True, token_version=1)
                session.add(user)
                session.flush()
                default_project(session, user.id)
                return schemas.UserResponse.model_validate(user)
        except IntegrityError:
            raise Conflict(f"email: {request.email} is already registered") from None

    def me(self, principal: Principal) -> schemas.UserResponse:
        """The caller's own record."""
        with self._uow.read() as session:
            return schemas.UserResponse.model_validate(_user(session, principal))

    def update_me(self, principal: Principal, request: schemas.UpdateMeRequest) -> schemas.UserResponse:
        """Change the caller's profile, and its password when the current one is given."""
        with self._uow.transaction() as session:
            user = _user(session, principal)
            changes: dict[str, Any] = request.model_dump(
                exclude_unset=True, exclude={"current_password", "new_password", "company_custom", "division_custom"}
            )
            if request.company_custom:
                changes["company"] = request.company_custom
            if request.division_custom:
                changes["division"] = request.division_custom
            for name, value in changes.items():
                setattr(user, name, value)
            if request.new_password is not None:
                if not request.current_password or not passwords.verify_password(user.password_hash,
                                                                                 request.current_password):
                    raise InvalidInput("current_password", "does not match the account's password")
                user.password_hash = passwords.hash_password(request.new_password)
                user.token_version += 1  # every refresh token issued before stops working
            session.flush()
            return schemas.UserResponse.model_validate(user)

    # -- API keys --------------------------------------------------------------------------------

    def create_api_key(self, principal: Principal, request: schemas.CreateApiKeyRequest) -> schemas.ApiKeyResponse:
        """A new key for some of the caller's projects; the key is in this answer only."""
        with self._uow.transaction() as session:
            user = _user(session, principal)
            for project_id in request.project_ids:
                if role_in(session, principal, str(project_id)) is None:
                    raise NotFound(f"project_ids: project {project_id} not found")
            key = API_KEY_PREFIX + secrets.token_urlsafe(32)
            row = ApiKey(user_id=user.id, name=request.name, prefix=key[:10], key_digest=key_digest(key),
                         project_ids=sorted({str(pid) for pid in request.project_ids}, key=int),
                         read_only=request.read_only, created_at=utcnow())
            session.add(row)
            session.flush()
            return _key_response(row, key=key)

    def list_api_keys(self, principal: Principal) -> list[schemas.ApiKeyResponse]:
        """The caller's keys (never the keys themselves)."""
        with self._uow.read() as session:
            user = _user(session, principal)
            rows = session.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id))
            return [_key_response(row) for row in rows]

    def revoke_api_key(self, principal: Principal, key_id: int) -> schemas.ApiKeyResponse:
        """Revoke one of the caller's keys."""
        with self._uow.transaction() as session:
            user = _user(session, principal)
            row = session.get(ApiKey, key_id)
            if row is None or row.user_id != user.id:
                raise NotFound(f"key_id: API key {key_id} not found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _key_response(row)


_DUMMY_HASH = passwords.hash_password(secrets.token_hex(16))


def _user(session: Session, principal: Principal) -> User:
    if principal.user_id is None:
        raise Forbidden("this credential is not a user's: log in or use a user's API key")
    user = session.get(User, principal.user_id)
    if user is None:
        raise NotFound("user not found")
    return user


def _key_response(row: ApiKey, *, key: str | None = None) -> schemas.ApiKeyResponse:
    return schemas.ApiKeyResponse(
        id=row.id, name=row.name, prefix=row.prefix, project_ids=[int(pid) for pid in row.project_ids],
        read_only=row.read_only, created_at=row.created_at, last_used_at=row.last_used_at,
        revoked_at=row.revoked_at, key=key,
    )


def _add_member(session: Session, project_id: int, user_id: int, role: str) -> None:
    exists = session.scalar(select(ProjectMember.id).where(ProjectMember.project_id == project_id,
                                                           ProjectMember.user_id == user_id))
    if exists is None:
        session.add(ProjectMember(project_id=project_id, user_id=user_id, role=role))


def default_project(session: Session, user_id: int) -> Project:
    """The user's own "Uncategorized" project (made on first need): where objects go when no project is named."""
    project = session.scalars(
        select(Project).where(Project.owner_id == user_id, Project.name == DEFAULT_PROJECT).order_by(Project.id)
    ).first()
    if project is None:
        project = Project(name=DEFAULT_PROJECT, description="Datasets and jobs created without a project",
                          owner_id=user_id)
        session.add(project)
        session.flush()
        _add_member(session, project.id, user_id, "owner")
        session.flush()
    return project
