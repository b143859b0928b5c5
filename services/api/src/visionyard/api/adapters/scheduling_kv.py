"""The scheduler's NATS side: its KV buckets (followed with watchers), the lease, the guarded command publish."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from visionyard.api.scheduling.lease import LeaseTaken
from visionyard.api.scheduling.scheduler import Change, Initial, RecordConflict
from visionyard.shared import streams, subjects
from visionyard.shared.bus import Bus
from visionyard.shared.scheduling import SUMMARY_KEY, AdmissionRecord, PositionShard, QueueRequest, QueueSummary
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.api.scheduling.kv")

# nats-server's error code for a publish whose `Nats-Expected-Last-Subject-Sequence` does not hold.
WRONG_LAST_SEQUENCE = 10071
RUNNER_EVENT_KINDS = ("started", "completed", "failed", "cancelled")


def _wrong_sequence(error: Exception) -> bool:
    return isinstance(error, KeyWrongLastSequenceError) or (
        isinstance(error, BadRequestError) and getattr(error, "err_code", None) == WRONG_LAST_SEQUENCE)


class KvSchedulerStore:
    """`sched_requests`, `sched_jobs`, `sched_projects`, `runner_devices`, `sched_status`, `job_terminal`."""

    FOLLOWED = {"request": streams.KV_SCHED_REQUESTS, "policy": streams.KV_SCHED_PROJECTS,
                "runner": streams.KV_RUNNER_DEVICES}

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._changes: asyncio.Queue[Change | Exception] = asyncio.Queue()
        self._watchers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> Initial:
        """Read the initial state of every bucket and keep following requests, policies and runners."""
        initial: dict[str, list[Change]] = {}
        for kind, bucket in self.FOLLOWED.items():
            kv = await self._bus.kv(bucket)
            watcher = await kv.watchall()
            self._watchers.append(watcher)
            entries: list[Change] = []
            async for entry in watcher:
                if entry is None:
                    break
                entries.append(_change(kind, entry))
            initial[kind] = entries
            self._tasks.append(asyncio.create_task(self._follow(kind, watcher), name=f"sched-watch-{bucket}"))
        records: list[tuple[AdmissionRecord, int]] = []
        jobs = await self._bus.kv(streams.KV_SCHED_JOBS)
        watcher = await jobs.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.operation is not None or not entry.value:
                    continue
                try:
                    records.append((AdmissionRecord.model_validate_json(entry.value), int(entry.revision or 0)))
                except ValueError as error:
                    log.warning("unreadable admission record %s: %s", entry.key, error)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return Initial(requests=initial["request"], records=records, policies=initial["policy"],
                       runners=initial["runner"])

    async def _follow(self, kind: str, watcher: Any) -> None:
        try:
            async for entry in watcher:
                if entry is not None:
                    await self._changes.put(_change(kind, entry))
            await self._changes.put(ConnectionError(f"the {kind} watch stopped"))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the scheduler steps down and starts over with a fresh read
            await self._changes.put(error)

    async def next_change(self) -> Change:
        """The next followed change; raises what broke a watch."""
        item = await self._changes.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        """Stop the watchers."""
        await cancel_all(self._tasks)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def request(self, job_id: str) -> tuple[QueueRequest, int] | None:
        """A job's request with its command."""
        kv = await self._bus.kv(streams.KV_SCHED_REQUESTS)
        try:
            entry = await kv.get(job_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return QueueRequest.model_validate_json(entry.value), int(entry.revision or 0)

    async def terminal_attempt(self, job_id: str) -> int | None:
        """The attempt `job_terminal` records for the job."""
        kv = await self._bus.kv(streams.KV_JOB_TERMINAL)
        try:
            entry = await kv.get(job_id)
        except KeyNotFoundError:
            return None
        try:
            return int(json.loads(entry.value or b"")["attempt"])
        except (ValueError, KeyError, TypeError):
            return None

    async def write_record(self, record: AdmissionRecord, *, expected: int | None) -> int:
        """Revision-checked write of a job's record."""
        kv = await self._bus.kv(streams.KV_SCHED_JOBS)
        value = record.model_dump_json().encode()
        try:
            if expected is None:
                return int(await kv.create(record.job_id, value))
            return int(await kv.update(record.job_id, value, last=expected))
        except Exception as error:
            if _wrong_sequence(error):
                raise RecordConflict(f"the record of job {record.job_id} is not at revision {expected}") from error
            raise

    async def delete_record(self, job_id: str, *, expected: int) -> None:
        """Revision-checked delete of a job's record."""
        kv = await self._bus.kv(streams.KV_SCHED_JOBS)
        try:
            await kv.delete(job_id, last=expected)
        except Exception as error:
            if _wrong_sequence(error):
                raise RecordConflict(f"the record of job {job_id} is not at revision {expected}") from error
            raise

    async def delete_request(self, job_id: str, *, expected: int) -> bool:
        """Revision-checked delete of a request; False when it changed meanwhile."""
        kv = await self._bus.kv(streams.KV_SCHED_REQUESTS)
        try:
            await kv.delete(job_id, last=expected)
            return True
        except Exception as error:
            if _wrong_sequence(error):
                return False
            raise

    async def last_runner_events(self, job_id: str) -> dict[str, int]:
        """The attempt of the job's last event of each kind a runner reports."""
        found: dict[str, int] = {}
        for kind in RUNNER_EVENT_KINDS:
            try:
                message = await self._bus.js.get_last_msg(streams.EVENTS.name, subjects.job_event(job_id, kind))
            except NotFoundError:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                found[kind] = int(json.loads(message.data or b"")["attempt"])
        return found

    async def write_status(self, key: str, value: bytes) -> None:
        """Put one `sched_status` entry."""
        kv = await self._bus.kv(streams.KV_SCHED_STATUS)
        await kv.put(key, value)

    async def purge_deleted(self) -> None:
        """Drop delete markers older than 30 minutes from the requests and records buckets."""
        for bucket in (streams.KV_SCHED_REQUESTS, streams.KV_SCHED_JOBS):
            kv = await self._bus.kv(bucket)
            await kv.purge_deletes(olderthan=30 * 60)


def _change(kind: str, entry: KeyValue.Entry) -> Change:
    deleted = entry.operation is not None or not entry.value
    return Change(kind=kind, key=entry.key, value=None if deleted else entry.value,  # type: ignore[arg-type]
                  revision=int(entry.revision or 0))


class BusCommandSender:
    """Publishes admitted commands into COMMANDS, at most one stored copy per attempt."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def send_once(self, subject: str, payload: bytes, *, message_id: str, headers: dict[str, str]) -> bool:
        """Store the command unless a copy of this attempt is in the stream; whether it was stored now."""
        try:
            ack = await self._bus.publish_raw(subject, payload, message_id=message_id,
                                              headers={**headers, "Nats-Expected-Last-Subject-Sequence": "0"})
        except Exception as error:
            if _wrong_sequence(error):
                return False  # queued or held by a runner already
            raise
        return not ack.duplicate


class KvLeaseStore:
    """The `sched_leader` bucket (entries expire after its TTL)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def create(self, key: str, value: bytes) -> int:
        """Take the key if nobody holds it."""
        kv = await self._bus.kv(streams.KV_SCHED_LEADER)
        return int(await kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Renew the key at the revision last written."""
        kv = await self._bus.kv(streams.KV_SCHED_LEADER)
        try:
            return int(await kv.update(key, value, last=last))
        except Exception as error:
            if _wrong_sequence(error):
                raise LeaseTaken(str(error)) from error
            raise

    async def delete(self, key: str, last: int) -> bool:
        """Give the key up."""
        kv = await self._bus.kv(streams.KV_SCHED_LEADER)
        return bool(await kv.delete(key, last=last))


class KvQueueStatus:
    """What any API replica reads to answer the queue routes."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def _get(self, bucket: str, key: str) -> bytes | None:
        kv = await self._bus.kv(bucket)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def summary(self) -> QueueSummary | None:
        """The scheduler's last summary."""
        value = await self._get(streams.KV_SCHED_STATUS, SUMMARY_KEY)
        return QueueSummary.model_validate_json(value) if value else None

    async def shard(self, key: str) -> PositionShard | None:
        """One shard of positions."""
        value = await self._get(streams.KV_SCHED_STATUS, key)
        return PositionShard.model_validate_json(value) if value else None

    async def request(self, job_id: str) -> QueueRequest | None:
        """A job's waiting request."""
        value = await self._get(streams.KV_SCHED_REQUESTS, job_id)
        return QueueRequest.model_validate_json(value) if value else None


async def watch_position_shards(bus: Bus) -> AsyncGenerator[tuple[str, PositionShard], None]:
    """Each write of a queue-position shard (`jobs.<n>` of `sched_status`), the current ones first.

    Runs until closed or until the watch fails (the caller watches again); the watcher is stopped either way.
    """
    kv = await bus.kv(streams.KV_SCHED_STATUS)
    watcher = await kv.watch("jobs.>")
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=5.0)
            except NatsTimeoutError:
                continue
            if entry is None or entry.operation is not None or not entry.value:
                continue
            yield entry.key, PositionShard.model_validate_json(entry.value)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
