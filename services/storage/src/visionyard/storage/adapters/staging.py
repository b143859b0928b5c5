"""The staging area on the NATS JetStream object store, through the shared bus."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

from nats.js.errors import NotFoundError

from visionyard.shared.bus import Bus, PermanentError
from visionyard.storage.ports import StagedObject, StagedObjectCorrupt, StagedObjectMissing

_DIGEST_PREFIX = "SHA-256="


class BusStagingArea:
    """Fetches and stages files in the `staging` object store, translating its errors to the port's."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def fetch(self, name: str, destination: Path, *, sha256: str) -> Path:
        """Copy a staged object out, verifying its sha256."""
        try:
            return await self.bus.get_file(name, destination, sha256=sha256)
        except NotFoundError as error:
            raise StagedObjectMissing(f"staged object {name} is gone (expired or never staged)") from error
        except PermanentError as error:  # the bus raises it for a sha256 mismatch
            raise StagedObjectCorrupt(str(error)) from error

    async def read(self, name: str, *, sha256: str) -> AsyncGenerator[bytes, None]:
        """A staged object's bytes as they arrive; the bus checks the sha256 after the last chunk."""
        try:
            async with contextlib.aclosing(self.bus.read_object(name, sha256=sha256)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except NotFoundError as error:
            raise StagedObjectMissing(f"staged object {name} is gone (expired or never staged)") from error
        except PermanentError as error:  # the bus raises it for a sha256 mismatch
            raise StagedObjectCorrupt(str(error)) from error

    async def read_incoming(self, object_id: str, size: int) -> AsyncGenerator[bytes, None]:
        """An object's chunks as `put_file(..., object_id=)` stores them (see `Bus.read_incoming`)."""
        async with contextlib.aclosing(self.bus.read_incoming(object_id, size)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stage(self, name: str, path: Path) -> StagedObject:
        """Put a local file into the object store."""
        sha256, size = await self.bus.put_file(name, path)
        return StagedObject(name=name, sha256=sha256, size_bytes=size)

    async def info(self, name: str) -> StagedObject | None:
        """What is staged under `name` (its digest comes from the object's metadata), or None."""
        store = await self.bus.object_store()
        try:
            info = await store.get_info(name)
        except NotFoundError:
            return None
        if getattr(info, "deleted", False) or not info.digest:
            return None
        encoded = info.digest
        if encoded.upper().startswith(_DIGEST_PREFIX):
            encoded = encoded[len(_DIGEST_PREFIX):]
        digest = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
        return StagedObject(name=name, sha256=digest, size_bytes=int(info.size or 0))
