"""Deployment keys: one bearer key per deployment, good for that deployment's endpoint only.

The original frontend shows a deployment's key again whenever its Test button is pressed (it reads
`deployment_config.api_key` from `GET /deployments/{id}`), so the key cannot be kept as a one-way digest
the way user API keys are. Storing it in plaintext would make a copy of the database a set of working
keys. Instead a deployment stores a random salt, and its key is HMAC-SHA256 over the deployment's id and
that salt under the API's signing secret (the one that signs access tokens):

- the database alone yields no key; re-deriving one needs the API's secret, and whoever holds that can
  already mint an admin token, so the scheme adds no new exposure;
- the deployment id is inside the MAC, so a key opens exactly one deployment and nothing else (it is not
  a user credential: no other route accepts it);
- the trade-off: rotating the API's secret changes every deployment's key (their owners read the new one
  from the deployment page), and a new salt revokes a leaked key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "vyd_"
_KEY = re.compile(r"^vyd_(\d{1,12})_([A-Za-z0-9_-]{43})$")


class DeploymentKeys:
    """Derives and checks deployment keys under the API's secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("deployment keys need the API's signing secret")
        self._secret = secret.encode()

    @staticmethod
    def new_salt() -> str:
        """A fresh random salt (a new salt is a new key)."""
        return secrets.token_hex(16)

    def key(self, deployment_id: int, salt: str) -> str:
        """The deployment's key: `vyd_<id>_<mac>`."""
        mac = hmac.new(self._secret, f"deployment-key:{deployment_id}:{salt}".encode(), hashlib.sha256).digest()
        return f"{KEY_PREFIX}{deployment_id}_{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    @staticmethod
    def deployment_of(key: str) -> int | None:
        """The deployment a well-formed key names (None for anything else)."""
        match = _KEY.match(key)
        return int(match.group(1)) if match else None

    def matches(self, key: str, deployment_id: int, salt: str | None) -> bool:
        """Whether `key` is that deployment's current key (constant-time)."""
        if not salt:
            return False
        return hmac.compare_digest(key.encode(), self.key(deployment_id, salt).encode())
