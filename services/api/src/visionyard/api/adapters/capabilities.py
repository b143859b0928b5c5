"""Capability manifests read from the `trainer_capabilities` KV bucket the runners fill."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.manifest import TrainerManifest

log = logging.getLogger("visionyard.api.capabilities")


class KvCapabilitySource:
    """Reads every manifest on each call: runners may come and go."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def manifests(self) -> list[TrainerManifest]:
        """Every manifest currently published; malformed entries are skipped with a warning."""
        kv = await self._bus.kv(streams.KV_CAPABILITIES)
        # The bucket's stream lists its subjects exactly; nats-py's `kv.keys()` can report an empty
        # bucket when its watcher's first consumer-info races the delivery of the existing entries.
        info = await self._bus.js.stream_info(f"KV_{streams.KV_CAPABILITIES}", subjects_filter=">")
        keys = [key for subject in (info.state.subjects or {})
                if (key := subjects.kv_key(streams.KV_CAPABILITIES, subject)) is not None]
        manifests: list[TrainerManifest] = []
        for key in sorted(keys):
            try:
                entry = await kv.get(key)
            except Exception:  # deleted between keys() and get()
                continue
            if not entry.value:
                continue
            try:
                manifests.append(TrainerManifest.model_validate_json(entry.value))
            except ValidationError as error:
                log.warning("ignoring malformed trainer manifest %s: %s", key, error)
        return manifests
