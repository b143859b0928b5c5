"""Domain errors the use cases raise; main.py maps each to one HTTP status."""

from __future__ import annotations


class NotFound(Exception):
    """A named resource does not exist (404)."""


class Conflict(Exception):
    """The request is legal but not in the resource's current state (409)."""


class InvalidInput(Exception):
    """A field's value is unacceptable (422); the message names the field and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TooLarge(Exception):
    """An upload exceeds the configured limit (413)."""


class Unavailable(Exception):
    """A service the request depends on did not answer (503)."""


class Forbidden(Exception):
    """The caller may see the resource but not do this to it (403): e.g. a viewer starting a job."""


class Unauthorized(Exception):
    """No valid credentials (401)."""


class BadRequest(Exception):
    """The request cannot be carried out as asked (400), e.g. a duplicate name the frontend reports as such."""


class GatewayTimeout(Exception):
    """A job the request waits for did not finish in time (504); it was cancelled."""


class UpstreamFailed(Exception):
    """A job the request waited for failed (502); the message carries its reason."""
