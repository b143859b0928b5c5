"""The scheduling policy: which waiting job the next free slot takes, and where every waiting job stands.

Pure: no I/O and no clock of its own. The scheduler (`scheduler.py`) mirrors the durable state from KV
into a `QueueBook` (waiting requests, admitted attempts, project policies, runner advertisements) and
asks it for the next admission; it is rebuilt from KV whenever another API replica takes over.

The order, among the jobs that could start right now (*eligible*: a slot is free, the project is under
its quotas, a live runner has the devices the job needs):

1. **priority**, highest first, strictly: a free slot never goes to a lower priority while an eligible job
   of a higher one waits. So every high-priority job starts before any normal one queued after it,
   unless its own project's quota or a missing device holds it back (then it is not eligible).
2. **fair share** across projects, by weight (1 unless configured): stride scheduling on *starts*. Each
   project has a pass value that grows by `1 / weight` with every job of it that starts; the project with
   the lowest pass goes next. Over any stretch where several projects wait, project `p` gets
   `weight_p / Σ weights` of the starts (within one job), whatever the depth of each queue: 200 queued
   jobs of one project and 2 of another both progress. A project that starts waiting again enters at the
   current virtual time (the pass of the last start), so an idle project cannot bank a burst. Shares are
   of starts, the quantity the issue asks to split; quotas (`max_running_jobs`, `max_gpus`) are what
   bounds how many slots one project holds when its jobs are long.
3. **FIFO**: the order the attempts were queued (a priority change keeps a job's place among its peers).

Quotas and devices filter eligibility; they never reorder. A job that is not eligible waits `queued`,
with the reason (`quota`, `no_device`, `no_runner`), while eligible jobs behind it start (backfill).

Cost: waiting jobs sit in one heap per (project, GPU count) *lane*; all jobs of a lane are equally
eligible, so the next admission looks at one head per lane (O(lanes), not O(jobs)) and an admission is
O(log n). The positions of every waiting job come from replaying the same order (`positions`),
O(n log lanes), done by the scheduler at most a few times a second.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from visionyard.shared.scheduling import (
    AdmissionRecord,
    Capacity,
    JobPosition,
    ProjectPolicy,
    ProjectQueue,
    QueueDepth,
    QueueSummary,
    WaitReason,
    queue_name,
)

# A runner counts as capacity while it renews its advertisement at least once per this many of its periods.
LIVENESS_PERIODS = 4.0
# An advertisement older than this when first read (e.g. left by a runner killed long ago) is ignored.
STALE_ADVERTISEMENT_SECONDS = 60.0
# The admission rate behind the start estimates is counted over this window.
RATE_WINDOW_SECONDS = 60.0
# Slot turnover (admitted attempts ending per second) is counted over this window for the lookahead.
TURNOVER_WINDOW_SECONDS = 10.0
DEFAULT_POLICY = ProjectPolicy()


def id_order(job_id: str) -> tuple[int, int, str]:
    """Job ids in numeric order (the API's are integers), others after them by text."""
    return (0, int(job_id), "") if job_id.isdigit() else (1, 0, job_id)


@dataclass(frozen=True)
class Waiting:
    """A queued attempt, as its `sched_requests` entry says (`revision`: that entry's KV revision)."""

    job_id: str
    attempt: int
    project_id: str
    priority: int
    queued_at: float
    gpus: int
    revision: int = 0

    @property
    def lane(self) -> tuple[str, int]:
        """Jobs of one project needing the same GPUs are equally eligible: one heap each."""
        return (self.project_id, self.gpus)

    def fifo(self) -> tuple[int, float, tuple[int, int, str]]:
        """Order within a lane: priority, then queue time, then id."""
        return (-self.priority, self.queued_at, id_order(self.job_id))


@dataclass
class Admitted:
    """An attempt handed to the runners and not ended yet (its `sched_jobs` record says `admitted`)."""

    job_id: str
    attempt: int
    project_id: str
    gpus: int
    admitted_at: float
    revision: int
    priority: int = 0
    started: bool = False


@dataclass(frozen=True)
class Finished:
    """The latest ended attempt of a job (its `sched_jobs` record says `done`): older requests are stale."""

    attempt: int
    revision: int
    done_at: float


@dataclass(frozen=True)
class RunnerView:
    """A runner's advertisement (`runner_devices`) and when this scheduler last saw it renewed."""

    runner_id: str
    slots: int
    gpus: int
    free_gpus: int
    export_inference_held: int
    every: float
    seen_at: float

    def alive(self, now: float) -> bool:
        """Whether it renewed its advertisement recently enough to count."""
        return now - self.seen_at <= max(self.every, 1.0) * LIVENESS_PERIODS


@dataclass(frozen=True)
class Room:
    """What the live runners have free right now, with admitted-but-unstarted jobs taken off."""

    runners: int
    slots: int
    free_slots: int
    gpus: int
    free_gpus: int
    largest_runner_gpus: int
    largest_free_gpus: int

    def public(self) -> Capacity:
        """The wire form."""
        return Capacity(runners=self.runners, slots=self.slots, free_slots=max(self.free_slots, 0), gpus=self.gpus,
                        free_gpus=max(self.free_gpus, 0))


@dataclass(frozen=True)
class Ended:
    """What an attempt's end changes in KV: the record to mark done, the request to delete."""

    job_id: str
    attempt: int
    project_id: str
    gpus: int
    record_revision: int | None  # None: no record yet (the job never ran): create one
    request_revision: int | None  # a waiting request of that attempt to delete (it was cancelled)


@dataclass
class _Usage:
    running: int = 0
    gpus: int = 0


@dataclass
class QueueBook:
    """The scheduler's mirror of the durable queue state, and the decisions made on it."""

    waiting: dict[str, Waiting] = field(default_factory=dict)
    admitted: dict[str, Admitted] = field(default_factory=dict)
    finished: dict[str, Finished] = field(default_factory=dict)
    policies: dict[str, ProjectPolicy] = field(default_factory=dict)
    runners: dict[str, RunnerView] = field(default_factory=dict)
    _lanes: dict[tuple[str, int], list[tuple[tuple[int, float, tuple[int, int, str]], int, Waiting]]] = field(
        default_factory=dict)
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _backlog: Counter[str] = field(default_factory=Counter)
    _pass: dict[str, float] = field(default_factory=dict)
    _virtual_time: float = 0.0
    _usage: dict[str, _Usage] = field(default_factory=dict)
    _reserved_gpus: int = 0
    _admissions: deque[float] = field(default_factory=deque)
    _ends: deque[float] = field(default_factory=deque)
    _since: float | None = None
    # Lookahead: while slots turn over fast, admit up to this many seconds of turnover (at most one job per
    # live runner) ahead of a slot actually being free, so a runner finishing a job finds the next command
    # already queued instead of waiting a scheduler round trip for it. 0: admit only into free slots.
    lookahead_seconds: float = 0.5

    # -- mirroring the durable state --------------------------------------------------------------

    def is_stale(self, job_id: str, attempt: int) -> bool:
        """Whether an attempt was admitted or ended already (its request must not start it again)."""
        admitted = self.admitted.get(job_id)
        finished = self.finished.get(job_id)
        return (admitted is not None and admitted.attempt >= attempt) or (finished is not None and finished.attempt >= attempt)

    def offer(self, job: Waiting) -> bool:
        """A request was put (new, or its priority changed); whether it waits (False: stale, see `is_stale`)."""
        if self.is_stale(job.job_id, job.attempt):
            return False
        previous = self.waiting.get(job.job_id)
        if previous is not None and (previous.attempt, previous.revision) > (job.attempt, job.revision):
            return True  # an older put seen late (the watch replays in order; a reload may not)
        if previous is None:
            if self._backlog[job.project_id] == 0:
                # Enters at the current virtual time: an idle project does not bank starts for a burst.
                self._pass[job.project_id] = max(self._pass.get(job.project_id, 0.0), self._virtual_time)
            self._backlog[job.project_id] += 1
        elif previous.project_id != job.project_id:
            self._forget(previous)
            self._backlog[job.project_id] += 1
        self.waiting[job.job_id] = job
        heapq.heappush(self._lanes.setdefault(job.lane, []), (job.fifo(), next(self._counter), job))
        return True

    def withdraw(self, job_id: str, *, attempt: int | None = None) -> Waiting | None:
        """A request was deleted (or is stale): it no longer waits."""
        job = self.waiting.get(job_id)
        if job is None or (attempt is not None and job.attempt > attempt):
            return None
        del self.waiting[job_id]
        self._forget(job)
        return job

    def _forget(self, job: Waiting) -> None:
        self._backlog[job.project_id] -= 1
        if self._backlog[job.project_id] <= 0:
            del self._backlog[job.project_id]
        # Its heap entry is dropped lazily (`_head`); a heap mostly made of dropped entries is rebuilt.
        lane = self._lanes.get(job.lane)
        if lane is not None and len(lane) > 64 and len(lane) > 4 * self._backlog.get(job.project_id, 0):
            self._lanes[job.lane] = [entry for entry in lane if self.waiting.get(entry[2].job_id) is entry[2]]
            heapq.heapify(self._lanes[job.lane])

    def load_record(self, record: AdmissionRecord, *, revision: int) -> None:
        """A `sched_jobs` record read when this scheduler took over."""
        if record.state == "done":
            self.finished[record.job_id] = Finished(attempt=record.attempt, revision=revision,
                                                    done_at=record.done_at or record.admitted_at)
            return
        self._hold(Admitted(job_id=record.job_id, attempt=record.attempt, project_id=record.project_id,
                            gpus=record.gpus, admitted_at=record.admitted_at, revision=revision,
                            priority=record.priority))

    def set_policy(self, project_id: str, policy: ProjectPolicy | None) -> None:
        """A project's weight and quotas (None: the defaults)."""
        if policy is None:
            self.policies.pop(project_id, None)
        else:
            self.policies[project_id] = policy

    def set_runner(self, runner_id: str, runner: RunnerView | None) -> None:
        """A runner's advertisement was renewed (or withdrawn: None)."""
        if runner is None:
            self.runners.pop(runner_id, None)
        else:
            self.runners[runner_id] = runner

    # -- decisions --------------------------------------------------------------------------------

    def room(self, now: float) -> Room:
        """Free slots and GPUs of the live runners, minus what admitted jobs will take."""
        live = [runner for runner in self.runners.values() if runner.alive(now)]
        slots = sum(runner.slots for runner in live)
        free_slots = slots - sum(runner.export_inference_held for runner in live) - len(self.admitted)
        advertised_free = sum(runner.free_gpus for runner in live)
        free_gpus = advertised_free - self._reserved_gpus
        largest_free = max((runner.free_gpus for runner in live), default=0)
        if self._reserved_gpus:
            largest_free = min(largest_free, free_gpus)
        return Room(runners=len(live), slots=slots, free_slots=free_slots, gpus=sum(runner.gpus for runner in live),
                    free_gpus=free_gpus, largest_runner_gpus=max((runner.gpus for runner in live), default=0),
                    largest_free_gpus=largest_free)

    def lookahead(self, now: float) -> int:
        """How many jobs to admit beyond the free slots now: `lookahead_seconds` of the recent slot turnover,
        at most one per live runner; 0 unless at least 1 / `lookahead_seconds` slots free per second.

        What it costs: a job queued now may start after up to this many jobs admitted just before it, which at
        that turnover start within about `lookahead_seconds`. With long jobs (slow turnover) it is 0, and a free
        slot always takes the highest-priority eligible job.
        """
        while self._ends and self._ends[0] < now - TURNOVER_WINDOW_SECONDS:
            self._ends.popleft()
        if self.lookahead_seconds <= 0 or not self._ends:
            return 0
        span = min(TURNOVER_WINDOW_SECONDS, max(now - (self._since if self._since is not None else now), 1.0))
        turnover = len(self._ends) / span
        runners = sum(1 for runner in self.runners.values() if runner.alive(now))
        return min(runners, int(turnover * self.lookahead_seconds))

    def next_admission(self, now: float) -> Waiting | None:
        """The job the next free slot takes (or, with the lookahead, the slot about to free), or None."""
        room = self.room(now)
        ahead = self.lookahead(now)
        if ahead:
            room = replace(room, free_slots=room.free_slots + ahead)
        if room.free_slots <= 0:
            return None
        best: Waiting | None = None
        best_key: tuple[object, ...] = ()
        for lane, heap in self._lanes.items():
            head = self._head(heap)
            if head is None:
                continue
            if self.wait_reason(lane[0], lane[1], room) is not None:
                continue
            key = (-head.priority, self._pass.get(lane[0], 0.0), head.queued_at, id_order(head.job_id))
            if best is None or key < best_key:
                best, best_key = head, key
        return best

    def admit(self, job: Waiting, *, revision: int, now: float) -> Admitted:
        """`job` was handed to the runners (its record written at `revision`): it holds a slot until it ends."""
        self.withdraw(job.job_id)
        self.finished.pop(job.job_id, None)
        self._virtual_time = self._pass.get(job.project_id, self._virtual_time)
        self._pass[job.project_id] = self._virtual_time + 1.0 / self._policy(job.project_id).weight
        admitted = Admitted(job_id=job.job_id, attempt=job.attempt, project_id=job.project_id, gpus=job.gpus,
                            admitted_at=now, revision=revision, priority=job.priority)
        self._hold(admitted)
        self._admissions.append(now)
        return admitted

    def _hold(self, admitted: Admitted) -> None:
        previous = self.admitted.get(admitted.job_id)
        if previous is not None:
            self._release(previous)
        self.admitted[admitted.job_id] = admitted
        usage = self._usage.setdefault(admitted.project_id, _Usage())
        usage.running += 1
        usage.gpus += admitted.gpus
        if not admitted.started:
            self._reserved_gpus += admitted.gpus

    def _release(self, admitted: Admitted) -> None:
        self.admitted.pop(admitted.job_id, None)
        usage = self._usage.setdefault(admitted.project_id, _Usage())
        usage.running -= 1
        usage.gpus -= admitted.gpus
        if not admitted.started:
            self._reserved_gpus -= admitted.gpus

    def started(self, job_id: str, attempt: int) -> bool:
        """A runner started an admitted attempt (or a later one of it, after a failover): its GPUs now show
        in that runner's advertisement, no longer as a reservation. Whether anything changed."""
        admitted = self.admitted.get(job_id)
        if admitted is None or attempt < admitted.attempt or admitted.started:
            return False
        admitted.started = True
        self._reserved_gpus -= admitted.gpus
        return True

    def ended(self, job_id: str, attempt: int, *, now: float) -> Ended | None:
        """An attempt ended (completed, failed, cancelled): its slot and quota are free again.

        Fencing as everywhere: the end of an attempt older than the admitted one changes nothing. An end
        of a job that never ran (cancelled while waiting) withdraws its request.
        """
        admitted = self.admitted.get(job_id)
        if admitted is not None:
            if attempt < admitted.attempt:
                return None
            self._release(admitted)
            self._ends.append(now)
            self.finished[job_id] = Finished(attempt=max(attempt, admitted.attempt), revision=admitted.revision,
                                             done_at=now)
            return Ended(job_id=job_id, attempt=max(attempt, admitted.attempt), project_id=admitted.project_id,
                         gpus=admitted.gpus, record_revision=admitted.revision, request_revision=None)
        previous = self.finished.get(job_id)
        if previous is not None and previous.attempt >= attempt:
            return None
        waiting = self.waiting.get(job_id)
        if waiting is not None and waiting.attempt > attempt:
            return None
        if waiting is not None:
            self.withdraw(job_id)
        # Also for a job not seen waiting yet: its end (a cancel) can overtake its request, which arrives
        # through another stream; the record then fences that request when it comes.
        self.finished[job_id] = Finished(attempt=attempt, revision=previous.revision if previous else 0, done_at=now)
        return Ended(job_id=job_id, attempt=attempt, project_id=waiting.project_id if waiting else "",
                     gpus=waiting.gpus if waiting else 0,
                     record_revision=previous.revision if previous and previous.revision else None,
                     request_revision=waiting.revision if waiting else None)

    def record_written(self, job_id: str, *, revision: int) -> None:
        """The `sched_jobs` record of a job now has `revision` (the next write of it checks it)."""
        admitted = self.admitted.get(job_id)
        if admitted is not None:
            admitted.revision = revision
        finished = self.finished.get(job_id)
        if finished is not None:
            self.finished[job_id] = Finished(attempt=finished.attempt, revision=revision, done_at=finished.done_at)

    def record_revision(self, job_id: str) -> int | None:
        """The revision of the job's `sched_jobs` record (None: it has none)."""
        admitted = self.admitted.get(job_id)
        if admitted is not None:
            return admitted.revision
        finished = self.finished.get(job_id)
        return finished.revision if finished is not None and finished.revision else None

    def wait_reason(self, project_id: str, gpus: int, room: Room) -> tuple[WaitReason, str] | None:
        """Why a job of this lane cannot start now (None: it could)."""
        if room.runners == 0:
            return "no_runner", "no runner is connected"
        if gpus and room.largest_runner_gpus < gpus:
            return "no_device", (f"no runner has {gpus} GPU{'s' if gpus > 1 else ''} "
                                 f"(the most any connected runner has is {room.largest_runner_gpus})")
        policy = self._policy(project_id)
        usage = self._usage.get(project_id) or _Usage()
        if policy.max_running_jobs is not None and usage.running >= policy.max_running_jobs:
            return "quota", (f"project {project_id} runs {usage.running} of its {policy.max_running_jobs} "
                             f"allowed job{'s' if policy.max_running_jobs != 1 else ''}")
        if gpus and policy.max_gpus is not None and usage.gpus + gpus > policy.max_gpus:
            return "quota", (f"project {project_id} uses {usage.gpus} of its {policy.max_gpus} allowed GPUs; "
                             f"this job needs {gpus}")
        if room.free_slots <= 0:
            return "capacity", "every runner slot is busy"
        if gpus and (room.free_gpus < gpus or room.largest_free_gpus < gpus):
            return "capacity", f"waiting for {gpus} free GPU{'s' if gpus > 1 else ''} on one runner"
        return None

    def _policy(self, project_id: str) -> ProjectPolicy:
        return self.policies.get(project_id, DEFAULT_POLICY)

    def _head(self, heap: list[tuple[tuple[int, float, tuple[int, int, str]], int, Waiting]]) -> Waiting | None:
        while heap:
            job = heap[0][2]
            if self.waiting.get(job.job_id) is job:
                return job
            heapq.heappop(heap)
        return None

    # -- reporting --------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """This scheduler's term began at `now` (rates are counted from then at the earliest)."""
        self._since = now

    def admission_rate(self, now: float) -> float:
        """Admissions per second over the last minute (or since this scheduler took over, if later)."""
        if self._since is None:
            self._since = now
        while self._admissions and self._admissions[0] < now - RATE_WINDOW_SECONDS:
            self._admissions.popleft()
        span = min(RATE_WINDOW_SECONDS, max(now - self._since, 1.0))
        return len(self._admissions) / span

    def projected_order(self) -> list[Waiting]:
        """Every waiting job in the order this policy would start them if slots freed one by one, no job
        arrived and no quota or device held any back: priority, fair share (simulated passes), FIFO."""
        lanes = {lane: sorted((entry for entry in heap if self.waiting.get(entry[2].job_id) is entry[2]),
                              key=lambda entry: entry[0])
                 for lane, heap in self._lanes.items()}
        passes = dict(self._pass)
        frontier: list[tuple[int, float, float, tuple[int, int, str], tuple[str, int], int]] = []
        for lane, entries in lanes.items():
            if entries:
                head = entries[0][2]
                frontier.append((-head.priority, passes.get(lane[0], 0.0), head.queued_at, id_order(head.job_id), lane, 0))
        heapq.heapify(frontier)
        order: list[Waiting] = []
        while frontier:
            negative_priority, pass_value, queued_at, ident, lane, index = heapq.heappop(frontier)
            current = passes.get(lane[0], 0.0)
            if pass_value != current:
                # The project started another job meanwhile (from another lane): its pass grew.
                heapq.heappush(frontier, (negative_priority, current, queued_at, ident, lane, index))
                continue
            job = lanes[lane][index][2]
            order.append(job)
            passes[lane[0]] = current + 1.0 / self._policy(lane[0]).weight
            if index + 1 < len(lanes[lane]):
                following = lanes[lane][index + 1][2]
                heapq.heappush(frontier, (-following.priority, passes[lane[0]], following.queued_at,
                                          id_order(following.job_id), lane, index + 1))
        return order

    def positions(self, now: float) -> dict[str, JobPosition]:
        """Where every waiting job stands, and every admitted job that no runner started yet.

        `jobs_ahead` counts the jobs before it in `projected_order` that could start now; a job held back
        by its own project's quota or a missing device is not ahead of anyone, and says so as its reason.
        The estimate is `(jobs_ahead + 1) / admission rate` for a job only capacity holds back.
        """
        room = self.room(now)
        rate = self.admission_rate(now)
        reasons: dict[tuple[str, int], tuple[WaitReason, str] | None] = {}
        positions: dict[str, JobPosition] = {}
        ahead = 0
        for job in self.projected_order():
            if job.lane not in reasons:
                reasons[job.lane] = self.wait_reason(job.project_id, job.gpus, room)
            blocked = reasons[job.lane]
            if blocked is not None and blocked[0] in ("quota", "no_device", "no_runner"):
                reason, detail = blocked
            elif ahead:
                reason, detail = "priority", f"{ahead} job{'s' if ahead > 1 else ''} ahead (higher priority, fair share or queued earlier)"
            elif blocked is not None:
                reason, detail = blocked
            else:
                reason, detail = "capacity", "next to start"
            estimate = (ahead + 1) / rate if rate > 0 and reason in ("priority", "capacity") else None
            positions[job.job_id] = JobPosition(
                position=ahead + 1, jobs_ahead=ahead, reason=reason, detail=detail, priority=job.priority,
                queue=queue_name(job.gpus), project_id=job.project_id,
                estimated_start_seconds=round(estimate, 1) if estimate is not None else None,
            )
            if blocked is None or blocked[0] == "capacity":
                ahead += 1
        for admitted in self.admitted.values():
            if not admitted.started:
                positions[admitted.job_id] = JobPosition(
                    position=0, jobs_ahead=0, reason="dispatching", detail="handed to the runners; starting",
                    priority=admitted.priority, queue=queue_name(admitted.gpus), project_id=admitted.project_id,
                )
        return positions

    def summary(self, now: float, *, scheduler: str) -> QueueSummary:
        """Every queue's depth by project and priority, with the capacity counted."""
        room = self.room(now)
        waiting: dict[str, dict[str, Counter[int]]] = {}
        running: dict[str, Counter[str]] = {}
        for job in self.waiting.values():
            waiting.setdefault(queue_name(job.gpus), {}).setdefault(job.project_id, Counter())[job.priority] += 1
        for admitted in self.admitted.values():
            running.setdefault(queue_name(admitted.gpus), Counter())[admitted.project_id] += 1
        queues = []
        for name in sorted(set(waiting) | set(running), key=lambda text: (text != "cpu", len(text), text)):
            by_project = waiting.get(name, {})
            projects = []
            for project_id in sorted(set(by_project) | set(running.get(name, {})), key=lambda pid: id_order(pid)):
                counts = by_project.get(project_id, Counter())
                policy = self._policy(project_id)
                usage = self._usage.get(project_id) or _Usage()
                projects.append(ProjectQueue(
                    project_id=project_id, waiting=sum(counts.values()), running=running.get(name, Counter())[project_id],
                    by_priority={str(priority): count for priority, count in sorted(counts.items(), reverse=True)},
                    weight=policy.weight, max_running_jobs=policy.max_running_jobs, max_gpus=policy.max_gpus,
                    gpus_in_use=usage.gpus,
                ))
            queues.append(QueueDepth(queue=name, waiting=sum(p.waiting for p in projects),
                                     running=sum(p.running for p in projects), projects=projects))
        return QueueSummary(updated_at=now, scheduler=scheduler, admitted_per_second=round(self.admission_rate(now), 2),
                            capacity=room.public(), queues=queues)
