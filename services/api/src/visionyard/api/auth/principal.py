"""The authenticated caller a request acts for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """A user (by token or API key), an operator key from the settings, or the embedded anonymous admin.

    `key_projects` narrows an API key to its projects (None: the user's own reach); `read_only` keys
    may only read.
    """

    user_id: int | None
    email: str
    is_admin: bool
    via: str  # "token", "api_key", "settings_key" or "anonymous"
    key_projects: frozenset[str] | None = None
    read_only: bool = False
