"""Copies of large checkpoints started while the runner is still staging them.

Without them a checkpoint crosses two hops in turn: the runner puts it into the staging object store,
and only after its `checkpoint` event does storage read it back into S3. For a 200 MB checkpoint that
was ~1 s of staging followed by ~2 s of copying. The runner now announces a large checkpoint
(`CheckpointIncoming`, core NATS) with the id its chunks are put under, so storage can read the chunks
as they are stored and send them on as multipart parts: the two hops overlap.

Nothing becomes visible early. The upload is held open (parts sent, not completed) until the durable
`CheckpointStaged` event arrives and names the same object with the same sha256 and size; only then
is it completed at the key, after the same stale-event check as any other copy. Any other outcome —
the put failed, the event names other bytes, a newer checkpoint was already stored, the event never
comes within `claim_seconds`, the hint was lost or went to another replica — aborts the upload, and
the event (if any) is handled by the ordinary copy. A hint can cost time, never a wrong object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from visionyard.shared.events import CheckpointStaged
from visionyard.shared.requests import CheckpointIncoming
from visionyard.storage.ports import ObjectBackend, ObjectUpload, StagingArea

log = logging.getLogger("visionyard.storage.incoming")

# Copies held at once; a hint beyond them is ignored (its checkpoint is copied after staging).
MAX_INCOMING = 2
# How long a finished copy waits for its `checkpoint` event before it is aborted.
CLAIM_SECONDS = 120.0


@dataclass
class _Copied:
    """What an incoming copy read and sent: its upload (open), the bytes' sha256 and their count."""

    upload: ObjectUpload
    sha256: str
    size: int


@dataclass
class _Incoming:
    hint: CheckpointIncoming
    bucket: str
    key: str
    claimed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[_Copied | None] | None = None


class IncomingCopies:
    """The copies in flight, by staging object name."""

    def __init__(
        self,
        *,
        backend: ObjectBackend,
        staging: StagingArea,
        max_incoming: int = MAX_INCOMING,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> None:
        self.backend = backend
        self.staging = staging
        self.max_incoming = max_incoming
        self.claim_seconds = claim_seconds
        self._copies: dict[str, _Incoming] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def start(self, hint: CheckpointIncoming, *, bucket: str, key: str) -> bool:
        """Start copying an announced checkpoint to `bucket/key` (not completed); whether it started."""
        if hint.object_name in self._copies or len(self._copies) >= self.max_incoming:
            return False
        incoming = _Incoming(hint=hint, bucket=bucket, key=key)
        self._copies[hint.object_name] = incoming
        incoming.task = asyncio.create_task(self._copy(incoming), name=f"incoming:{hint.object_name}")
        return True

    async def claim(self, event: CheckpointStaged, *, bucket: str, key: str) -> tuple[str, int] | None:
        """Complete the copy of `event`'s object if one was made of exactly its bytes: (uri, size).

        None when there is none or it does not match (it is then aborted): copy the ordinary way.
        """
        incoming = self._copies.pop(event.object_name, None)
        if incoming is None or incoming.task is None:
            return None
        incoming.claimed.set()
        copied = await incoming.task
        if copied is None:
            return None
        hint = incoming.hint
        same = (
            (hint.job_id, hint.checkpoint_kind, incoming.bucket, incoming.key)
            == (event.job_id, event.checkpoint_kind, bucket, key)
            and copied.sha256 == event.sha256
            and copied.size == event.size_bytes
        )
        if not same:
            log.warning(
                "the copy of incoming %s does not match its checkpoint event (sha256 %s, %d bytes); copying again",
                event.object_name, copied.sha256, copied.size,
            )
            await _abort(copied.upload)
            return None
        uri = await asyncio.to_thread(copied.upload.complete)
        return uri, copied.size

    async def discard(self, object_name: str) -> None:
        """Abort the copy of `object_name`, if any (its event was stale or already stored)."""
        incoming = self._copies.pop(object_name, None)
        if incoming is not None:
            await self._stop(incoming)

    async def close(self) -> None:
        """Abort every copy (the service is stopping)."""
        copies, self._copies = list(self._copies.values()), {}
        for incoming in copies:
            await self._stop(incoming)

    async def _stop(self, incoming: _Incoming) -> None:
        incoming.claimed.set()
        if incoming.task is None:
            return
        incoming.task.cancel()
        # gather, not a bare await under suppress(CancelledError): a cancellation of our caller must
        # still propagate; the task's own cancellation comes back as a value.
        (outcome,) = await asyncio.gather(incoming.task, return_exceptions=True)
        if isinstance(outcome, _Copied):  # it had finished: its upload is still open
            await _abort(outcome.upload)

    async def _copy(self, incoming: _Incoming) -> _Copied | None:
        hint = incoming.hint
        upload: ObjectUpload | None = None
        # The blocking call running in a worker thread, if any. Each is shielded: cancelling this task
        # does not stop the thread, so the upload is aborted only once the thread is done with it (an
        # S3 part sent after the abort would leave an orphaned multipart upload behind).
        pending: asyncio.Future[Any] | None = None
        digest = hashlib.sha256()
        size = 0
        try:
            beginning = asyncio.ensure_future(
                asyncio.to_thread(self.backend.begin_upload, incoming.bucket, incoming.key)
            )
            pending = beginning
            upload = await asyncio.shield(beginning)
            async with contextlib.aclosing(self.staging.read_incoming(hint.object_id, hint.size_bytes)) as chunks:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    pending = asyncio.ensure_future(asyncio.to_thread(upload.write, chunk))
                    await asyncio.shield(pending)
            pending = None
            if not incoming.claimed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(incoming.claimed.wait(), self.claim_seconds)
        except BaseException as error:
            self._forget(incoming)
            if pending is not None:
                await asyncio.wait([pending])
                if upload is None and not pending.cancelled() and pending.exception() is None:
                    upload = pending.result()  # begun after all
            if upload is not None:
                await _abort(upload)
            if isinstance(error, asyncio.CancelledError):
                raise
            log.info("incoming copy of %s stopped: %s", hint.object_name, error)
            return None
        if not incoming.claimed.is_set():
            self._forget(incoming)
            log.info("incoming copy of %s was not claimed in %.0fs; aborted", hint.object_name, self.claim_seconds)
            await _abort(upload)
            return None
        return _Copied(upload=upload, sha256=digest.hexdigest(), size=size)

    def _forget(self, incoming: _Incoming) -> None:
        if self._copies.get(incoming.hint.object_name) is incoming:
            del self._copies[incoming.hint.object_name]


async def _abort(upload: ObjectUpload) -> None:
    try:
        await asyncio.to_thread(upload.abort)
    except Exception:  # the upload stays invisible either way
        log.warning("could not abort an incoming copy's upload", exc_info=True)
