"""The elected scheduler's use cases: rebuild the queue from KV, admit jobs, release them, report positions.

Admission control in front of the runners, as Kueue does for Kubernetes: the scheduler never places a job
on a runner. It decides *which* waiting attempt goes next and when (priority, fair share, quotas,
devices: `policy.py`), then publishes its `StartTraining` into the COMMANDS work queue, where runners
pull it exactly as before — a runner still holds it unacknowledged with heartbeats, JetStream still hands
it to another runner when its runner dies, and attempt fencing is unchanged. The scheduler admits only
as many jobs as the live runners have free slots, so what sits in the work queue is always about to
start: a later high-priority job never waits behind a normal one that is merely buffered there.

Every decision is in KV before it takes effect, so whichever API replica holds the lease next (see
`lease.py`) rebuilds the same state:

1. an admission writes the job's `sched_jobs` record (`admitted`, the attempt), revision-checked: created
   if absent, else updated only from the revision this scheduler read — two schedulers (a paused ex-leader
   and the new one) can never both admit one attempt; the loser steps down;
2. then publishes the command on the attempt's own subject (`cmd.train.job.<id>.<attempt>`) with its
   message id and `Nats-Expected-Last-Subject-Sequence: 0`: the server stores it only if no copy of that
   attempt is in the stream (queued or held by a runner), and de-duplicates a repeat within two minutes;
3. then deletes the request (revision-checked: a priority change put after the read survives, and is
   then seen as stale and deleted);
4. when the attempt's terminal event arrives (EVENTS consumer `api-scheduler`, acked only after the
   record is written), the record becomes `done`: the slot and the project's quota are free again.

A scheduler that dies between 1 and 2 leaves an admitted record whose command was never sent; the next
one sees the record with its request still there and no runner event of that attempt, and publishes it
(step 2's guard makes that safe if it had been sent). Between 2 and 3 it leaves a stale request, which
the next one deletes. Nothing waits in a process: the queue is the `sched_requests` bucket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from visionyard.api.scheduling.policy import Ended, QueueBook, RunnerView, Waiting
from visionyard.shared import subjects, tracing
from visionyard.shared.scheduling import (
    POSITION_SHARDS,
    SUMMARY_KEY,
    AdmissionRecord,
    PositionShard,
    ProjectPolicy,
    QueueRequest,
    position_shard,
)

log = logging.getLogger("visionyard.api.scheduling")

# A done record is kept at least this long (and until the API recorded the attempt's end in `job_terminal`),
# then deleted so a new leader reads only recent records. A request queued more recently than this cannot be
# of an attempt whose record is gone, so only older ones are checked against `job_terminal` when admitted.
DONE_RECORD_GRACE_SECONDS = 3600.0
# At most this many jobs are admitted together (records written, then commands published, concurrently).
ADMISSION_BATCH = 64
# Requests up to this size are kept in memory as the watch delivers them, so admitting one reads nothing.
CACHED_REQUEST_BYTES = 64 * 1024
# Delete markers older than this are purged from the scheduler's buckets (hourly).
PURGE_EVERY_SECONDS = 3600.0
# The summary is rewritten at least this often, so a reader can tell a live scheduler from a gone one.
STATUS_REFRESH_SECONDS = 5.0


class RecordConflict(Exception):
    """A `sched_jobs` record changed under this scheduler: another one decides now; step down."""


@dataclass(frozen=True)
class Change:
    """A KV change the scheduler follows: a request, a project policy or a runner advertisement."""

    kind: Literal["request", "policy", "runner"]
    key: str
    value: bytes | None  # None: deleted
    revision: int


@dataclass(frozen=True)
class RunnerEvent:
    """An event of an admitted attempt: it started, or it ended."""

    kind: Literal["started", "completed", "failed", "cancelled"]
    job_id: str
    attempt: int


@dataclass
class Initial:
    """The state read when taking over."""

    requests: list[Change]
    records: list[tuple[AdmissionRecord, int]]
    policies: list[Change]
    runners: list[Change]


class QueueStore(Protocol):
    """The scheduler's KV buckets and the look-ups it needs (adapters/scheduling_kv.py)."""

    async def open(self) -> Initial:
        """Read every bucket the scheduler mirrors, and keep following the requests, policies and runners."""
        ...

    async def next_change(self) -> Change:
        """The next change after `open`'s initial state."""
        ...

    async def close(self) -> None:
        """Stop following."""
        ...

    async def request(self, job_id: str) -> tuple[QueueRequest, int] | None:
        """A job's request (with its command) and its revision, or None."""
        ...

    async def terminal_attempt(self, job_id: str) -> int | None:
        """The attempt at which the API recorded the job finished (`job_terminal`), or None."""
        ...

    async def write_record(self, record: AdmissionRecord, *, expected: int | None) -> int:
        """Write a job's record if its revision is still `expected` (None: only if it has none); its new
        revision. RecordConflict otherwise."""
        ...

    async def delete_record(self, job_id: str, *, expected: int) -> None:
        """Delete a job's record if its revision is still `expected`."""
        ...

    async def delete_request(self, job_id: str, *, expected: int) -> bool:
        """Delete a request if its revision is still `expected`; whether it was."""
        ...

    async def last_runner_events(self, job_id: str) -> dict[str, int]:
        """The attempt of the job's last `started`, `completed`, `failed` and `cancelled` event (those it has)."""
        ...

    async def write_status(self, key: str, value: bytes) -> None:
        """Put one `sched_status` entry."""
        ...

    async def purge_deleted(self) -> None:
        """Drop old delete markers from the scheduler's buckets."""
        ...


class CommandSender(Protocol):
    """Publishes an admitted attempt's command into the COMMANDS work queue."""

    async def send_once(self, subject: str, payload: bytes, *, message_id: str, headers: dict[str, str]) -> bool:
        """Store it unless a copy is in the stream already (expected last subject sequence 0); whether it was
        stored now (False: a copy was there, or it was a duplicate)."""
        ...


def parse_request(change: Change) -> Waiting | None:
    """The waiting job a request entry describes (its command is left in KV), or None if unreadable."""
    try:
        raw = json.loads(change.value or b"")
        return Waiting(job_id=str(raw["job_id"]), attempt=int(raw["attempt"]), project_id=str(raw["project_id"]),
                       priority=int(raw.get("priority", 50)), queued_at=float(raw["queued_at"]),
                       gpus=int(raw.get("gpus", 0)), revision=change.revision)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("unreadable queue request %s: %s", change.key, error)
        return None


def parse_runner(change: Change, *, now: float, initial: bool) -> RunnerView | None:
    """A runner's advertisement; None when withdrawn, unreadable, or (when first read) long stale."""
    if change.value is None:
        return None
    try:
        raw = json.loads(change.value)
        if initial and now - float(raw.get("updated_at", 0)) > 60.0:
            return None  # left behind by a runner killed long ago
        return RunnerView(runner_id=str(raw.get("runner_id", change.key)), slots=int(raw.get("slots", 0)),
                          gpus=len(raw.get("gpus") or []), free_gpus=len(raw.get("free_gpus") or []),
                          export_inference_held=int(raw.get("export_inference_held", 0)), every=float(raw.get("advertise_seconds") or 5.0),
                          seen_at=now)
    except (ValueError, TypeError) as error:
        log.warning("unreadable runner advertisement %s: %s", change.key, error)
        return None


class Scheduler:
    """The leader's state and decisions; one instance per term of leadership."""

    def __init__(self, *, store: QueueStore, sender: CommandSender, scheduler_id: str,
                 clock: Callable[[], float] = time.time, lookahead_seconds: float = 0.5) -> None:
        self.book = QueueBook(lookahead_seconds=lookahead_seconds)
        self._store = store
        self._sender = sender
        self._id = scheduler_id
        self._clock = clock
        self.wake = asyncio.Event()
        self.status_changed = asyncio.Event()
        self._written_status: dict[str, bytes] = {}
        self.admitted_total = 0
        # The latest value of each waiting request (revision, bytes): admitting needs no read of it.
        self._requests: dict[str, tuple[int, bytes]] = {}
        self._deletions: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    # -- taking over ------------------------------------------------------------------------------

    async def take_over(self, initial: Initial) -> None:
        """Rebuild the book from KV, then finish what the previous scheduler left half done."""
        now = self._clock()
        self.book.start(now)
        for record, revision in initial.records:
            self.book.load_record(record, revision=revision)
        for change in initial.policies:
            self._apply_policy(change)
        for change in initial.runners:
            self.book.set_runner(change.key, parse_runner(change, now=now, initial=True))
        stale: dict[str, Waiting] = {}
        for change in initial.requests:
            if change.value is None:
                continue
            job = parse_request(change)
            if job is None:
                continue
            if self.book.offer(job):
                self._remember(change)
            else:
                stale[job.job_id] = job
        for admitted in list(self.book.admitted.values()):
            seen = await self._store.last_runner_events(admitted.job_id)
            ended = max((seen.get(kind, 0) for kind in ("completed", "failed", "cancelled")), default=0)
            if ended >= admitted.attempt:
                continue  # its end is waiting in the `api-scheduler` consumer
            if seen.get("started", 0) >= admitted.attempt:
                self.book.started(admitted.job_id, seen["started"])
                continue
            left = stale.get(admitted.job_id)
            if left is not None and left.attempt == admitted.attempt:
                # Admitted, but the request is still there: its command may never have been sent.
                fetched = await self._store.request(admitted.job_id)
                if fetched is not None and fetched[0].attempt == admitted.attempt:
                    stored = await self._send(fetched[0])
                    log.info("re-sent the command of an admitted attempt after a takeover",
                             extra={"job_id": admitted.job_id, "attempt": admitted.attempt, "stored": stored})
        for job in stale.values():
            await self._store.delete_request(job.job_id, expected=job.revision)
        log.info("scheduler took over", extra={"scheduler": self._id, "waiting": len(self.book.waiting),
                                               "admitted": len(self.book.admitted)})
        self.wake.set()
        self.status_changed.set()

    # -- following KV ------------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        """A request, policy or runner advertisement changed."""
        if change.kind == "request":
            if change.value is None:
                self.book.withdraw(change.key)
                self._requests.pop(change.key, None)
            else:
                job = parse_request(change)
                if job is not None and self.book.offer(job):
                    self._remember(change)
                elif job is not None:
                    # Its attempt was admitted (or ended) already: a late put, e.g. a priority change.
                    self._deletions.put_nowait((job.job_id, job.revision))
        elif change.kind == "policy":
            self._apply_policy(change)
        else:
            self.book.set_runner(change.key, parse_runner(change, now=self._clock(), initial=False))
        self.wake.set()
        self.status_changed.set()

    def _remember(self, change: Change) -> None:
        if change.value is not None and len(change.value) <= CACHED_REQUEST_BYTES:
            self._requests[change.key] = (change.revision, change.value)
        else:
            self._requests.pop(change.key, None)  # a big one (a long split) is read when admitted

    def _apply_policy(self, change: Change) -> None:
        policy = None
        if change.value is not None:
            try:
                policy = ProjectPolicy.model_validate_json(change.value)
            except ValueError as error:
                log.warning("unreadable project policy %s: %s", change.key, error)
        self.book.set_policy(change.key, policy)

    async def on_events(self, events: list[RunnerEvent]) -> None:
        """Admitted attempts started or ended; an end frees the slot at once, and the record says `done` before
        the events are acknowledged (a scheduler that dies first gets them again: the write is redone)."""
        now = self._clock()
        writes = []
        for event in events:
            if event.kind == "started":
                self.book.started(event.job_id, event.attempt)
                continue
            ended = self.book.ended(event.job_id, event.attempt, now=now)
            if ended is not None:
                writes.append(ended)
        # The freed slots are offered before the records are written: admitting never waits on that write.
        self.wake.set()
        self.status_changed.set()
        await asyncio.gather(*(self._record_end(ended, now=now) for ended in writes))

    async def _record_end(self, ended: Ended, *, now: float) -> None:
        record = AdmissionRecord(job_id=ended.job_id, attempt=ended.attempt, project_id=ended.project_id,
                                 gpus=ended.gpus, state="done", admitted_at=now, done_at=now, scheduler=self._id)
        revision = await self._store.write_record(record, expected=ended.record_revision)
        self.book.record_written(ended.job_id, revision=revision)
        if ended.request_revision is not None:
            await self._store.delete_request(ended.job_id, expected=ended.request_revision)

    # -- admitting ---------------------------------------------------------------------------------

    async def admit_ready(self, *, may_decide: Callable[[], bool]) -> int:
        """Admit jobs while slots are free and this scheduler still holds the lease; how many.

        The jobs a round of free slots takes are chosen one by one (each choice sees the previous ones'
        slots, quotas and passes taken), then admitted together: their records written concurrently, then
        their commands published concurrently — two broker round trips per round, not per job.
        """
        admitted = 0
        while may_decide():
            now = self._clock()
            chosen: list[tuple[Waiting, QueueRequest, int, int | None]] = []
            while len(chosen) < ADMISSION_BATCH:
                job = self.book.next_admission(now)
                if job is None:
                    break
                request = await self._current_request(job)
                if request is None:
                    continue
                # The record's revision as read (None: it has none), checked by the write that admits it.
                expected = self.book.record_revision(job.job_id)
                self.book.admit(job, revision=0, now=now)  # holds its slot, quota and pass from now on
                chosen.append((job, *request, expected))
            if not chosen:
                break
            await self._admit(chosen, now=now)
            admitted += len(chosen)
        if admitted:
            self.status_changed.set()
        return admitted

    async def _current_request(self, job: Waiting) -> tuple[QueueRequest, int] | None:
        """The job's request with its command, if it still stands as the book has it (else the book is corrected)."""
        cached = self._requests.get(job.job_id)
        if cached is not None and cached[0] == job.revision:
            request, revision = QueueRequest.model_validate_json(cached[1]), job.revision
        else:
            fetched = await self._store.request(job.job_id)
            if fetched is None:
                self.book.withdraw(job.job_id, attempt=job.attempt)  # deleted meanwhile; the watch confirms
                return None
            request, revision = fetched
        if (request.attempt, request.priority, request.project_id, request.gpus) != (
                job.attempt, job.priority, job.project_id, job.gpus):
            # Put again since the watch delivered it (a priority change): decide on the newer one.
            self.book.offer(Waiting(job_id=request.job_id, attempt=request.attempt, project_id=request.project_id,
                                    priority=request.priority, queued_at=request.queued_at, gpus=request.gpus,
                                    revision=revision))
            return None
        if (self.book.record_revision(job.job_id) is None and job.job_id not in self.book.finished
                and request.queued_at < self._clock() - DONE_RECORD_GRACE_SECONDS):
            # No record, and queued long ago: its record may have been collected after the API recorded the
            # job's end. `job_terminal` fences such a late request (a younger one cannot be: see the grace).
            terminal = await self._store.terminal_attempt(job.job_id)
            if terminal is not None and terminal >= job.attempt:
                self.book.withdraw(job.job_id)
                self._deletions.put_nowait((job.job_id, revision))
                return None
        return request, revision

    async def _admit(self, chosen: list[tuple[Waiting, QueueRequest, int, int | None]], *, now: float) -> None:
        records = [
            AdmissionRecord(job_id=job.job_id, attempt=job.attempt, project_id=job.project_id, gpus=job.gpus,
                            priority=job.priority, state="admitted", admitted_at=now,
                            subject=subjects.admitted_train(job.job_id, job.attempt, gpus=job.gpus), scheduler=self._id)
            for job, _, _, _ in chosen
        ]
        # 1. the decisions, durably (revision-checked: a conflict means another scheduler decides; step down) ...
        revisions = await asyncio.gather(*(self._store.write_record(record, expected=expected)
                                           for record, (_, _, _, expected) in zip(records, chosen, strict=True)))
        for (job, _, _, _), revision in zip(chosen, revisions, strict=True):
            self.book.record_written(job.job_id, revision=revision)
        # 2. ... then the commands, at most one stored copy per attempt ...
        await asyncio.gather(*(self._send_traced(request) for _, request, _, _ in chosen))
        # 3. ... and the requests go (off the admission path; a new scheduler deletes what is left).
        for job, _, revision, _ in chosen:
            self._requests.pop(job.job_id, None)
            self._deletions.put_nowait((job.job_id, revision))
        self.admitted_total += len(chosen)

    async def _send_traced(self, request: QueueRequest) -> bool:
        # Continues the trace of the request that queued the job (its REST call).
        with tracing.span("scheduler admit", headers=request.trace or None, job_id=request.job_id,
                          attempt=request.attempt):
            return await self._send(request)

    async def delete_requests(self) -> None:
        """Delete admitted (or stale) requests, revision-checked, as they come (runs beside the admissions)."""
        while True:
            job_id, revision = await self._deletions.get()
            await self._store.delete_request(job_id, expected=revision)

    async def _send(self, request: QueueRequest) -> bool:
        subject = subjects.admitted_train(request.job_id, request.attempt, gpus=request.gpus)
        return await self._sender.send_once(subject, request.command.to_bytes(),
                                            message_id=request.command.message_id, headers=dict(request.trace))

    # -- reporting and housekeeping ------------------------------------------------------------------

    async def write_status(self) -> float:
        """Write the summary and every position shard that changed; seconds it took to compute."""
        started = time.perf_counter()
        now = self._clock()
        positions = self.book.positions(now)
        shards: dict[str, PositionShard] = {f"jobs.{index}": PositionShard(updated_at=now) for index in range(POSITION_SHARDS)}
        for job_id, position in positions.items():
            shards[position_shard(job_id)].jobs[job_id] = position
        values = {SUMMARY_KEY: self.book.summary(now, scheduler=self._id).model_dump_json().encode()}
        for key, shard in shards.items():
            values[key] = shard.model_dump_json().encode()
        elapsed = time.perf_counter() - started
        for key, value in values.items():
            previous = self._written_status.get(key)
            # A shard's content without its timestamp decides whether it changed (the summary is always renewed).
            if key != SUMMARY_KEY and previous is not None and _without_time(previous) == _without_time(value):
                continue
            await self._store.write_status(key, value)
            self._written_status[key] = value
        return elapsed

    async def collect_done_records(self) -> int:
        """Delete `done` records the API has recorded as finished for a while; how many."""
        now = self._clock()
        collected = 0
        for job_id, finished in list(self.book.finished.items()):
            if now - finished.done_at < DONE_RECORD_GRACE_SECONDS or job_id in self.book.waiting or not finished.revision:
                continue
            terminal = await self._store.terminal_attempt(job_id)
            if terminal is None or terminal < finished.attempt:
                continue
            try:
                await self._store.delete_record(job_id, expected=finished.revision)
            except RecordConflict:
                raise
            self.book.finished.pop(job_id, None)
            collected += 1
        return collected


def _without_time(value: bytes) -> bytes:
    # `{"updated_at":<float>,` is the first member of every shard: compare what follows it.
    comma = value.find(b",")
    return value[comma:] if comma > 0 else value
