"""Who is calling and what they may do: users, tokens, API keys, projects' roles.

Every route resolves its caller with one dependency (`CurrentPrincipal`) and checks project access
through `auth.access`, so another project's objects answer 404 and a viewer's writes answer 403.
"""

from visionyard.api.auth.access import Role, project_filter, require_project_role
from visionyard.api.auth.dependencies import (
    CurrentPrincipal,
    require_principal,
    resolve_socket_principal,
)
from visionyard.api.auth.principal import Principal

__all__ = [
    "CurrentPrincipal",
    "Principal",
    "Role",
    "project_filter",
    "require_principal",
    "require_project_role",
    "resolve_socket_principal",
]
