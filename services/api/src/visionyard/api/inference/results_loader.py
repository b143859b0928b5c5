"""Before projection: attach the per-image rows of a completed inference job to its event.

The rows travel as a staged file (bytes never ride inside events); the projector applies events in
a worker thread inside one transaction, so the file is fetched here, asynchronously, beforehand.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Protocol

from visionyard.shared.bus import TransientError
from visionyard.shared.events import InferenceCompleted
from visionyard.shared.messages import Message


class StagedFiles(Protocol):
    """The staging object store."""

    async def get_file(self, name: str, destination: Path, *, sha256: str | None = None) -> Path:
        """Fetch a staged object, verified by sha256."""
        ...


class InferenceResultsLoader:
    """Loads a completed inference job's staged results into its event (other events pass through)."""

    def __init__(self, staging: StagedFiles) -> None:
        self._staging = staging

    async def __call__(self, event: Message) -> Message:
        """The event, with `results.rows` filled for `InferenceCompleted`."""
        if not isinstance(event, InferenceCompleted) or not event.results_object:
            return event
        with tempfile.TemporaryDirectory(prefix="vy-results-") as scratch:
            try:
                path = await self._staging.get_file(event.results_object, Path(scratch) / "results.json",
                                                     sha256=event.results_sha256)
            except Exception as error:  # the broker or the object is briefly unavailable: retry the batch
                raise TransientError(f"cannot load results {event.results_object}: {error}") from error
            document = await asyncio.to_thread(lambda: json.loads(path.read_text()))
        results = {**event.results, **document.get("summary", {}), "rows": document.get("results", [])}
        return event.model_copy(update={"results": results})
