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
