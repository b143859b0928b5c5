"""The training jobs' repositories: jobs with their checkpoints, metric and log rows. They never commit."""

from __future__ import annotations

import builtins  # `JobRepository.list` shadows the builtin in the class's later annotations
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table, and_, func, or_, select
from sqlalchemy.orm import Session

from visionyard.api.db.inserts import insert_ignoring_duplicates
from visionyard.api.db.models import Checkpoint, TrainingJob, TrainingLog, TrainingMetric


class JobRepository:
    """Training jobs and their projected rows (metrics, logs, checkpoints)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, job: TrainingJob) -> None:
        """Stage a new job."""
        self.session.add(job)

    def get(self, job_id: str, *, for_update: bool = False) -> TrainingJob | None:
        """One job, locked for the transaction when `for_update` (PostgreSQL)."""
        query = select(TrainingJob).where(TrainingJob.id == job_id)
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def count_by_status(self) -> dict[str, int]:
        """How many training jobs are in each status (the `/metrics` jobs-by-state gauge)."""
        rows = self.session.execute(select(TrainingJob.status, func.count()).group_by(TrainingJob.status))
        return {status: count for status, count in rows}

    def list(
        self, *, projects: set[str] | None, status: str | None, limit: int, offset: int
    ) -> tuple[Sequence[TrainingJob], int]:
        """A page of jobs in `projects` (None: all), newest first, and how many match in all."""
        query = select(TrainingJob)
        if projects is not None:
            query = query.where(TrainingJob.project_id.in_(sorted(projects)))
        if status:
            query = query.where(TrainingJob.status == status)
        total = self.session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.session.scalars(
            query.order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc()).limit(limit).offset(offset)
        ).all()
        return rows, total

    def active_using_dataset(self, dataset_id: str) -> int:
        """How many queued/running/cancelling jobs train on a dataset."""
        return self.session.scalar(
            select(func.count())
            .select_from(TrainingJob)
            .where(TrainingJob.dataset_id == dataset_id, TrainingJob.status.in_(("queued", "retrying", "resuming", "running", "cancelling")))
        ) or 0

    def metrics(self, job_id: str, *, limit: int, newest: bool = False) -> builtins.list[TrainingMetric]:
        """Metric rows oldest first: the first `limit`, or the last `limit` when `newest`."""
        order = (TrainingMetric.attempt, TrainingMetric.seq, TrainingMetric.id)
        query = select(TrainingMetric).where(TrainingMetric.job_id == job_id)
        if newest:
            rows = list(self.session.scalars(query.order_by(*(c.desc() for c in order)).limit(limit)).all())
            return rows[::-1]
        return list(self.session.scalars(query.order_by(*order).limit(limit)).all())

    def metric_count(self, job_id: str) -> int:
        """How many metric rows a job has."""
        return self.session.scalar(
            select(func.count()).select_from(TrainingMetric).where(TrainingMetric.job_id == job_id)
        ) or 0

    def logs(self, job_id: str, *, limit: int, log_type: str | None) -> builtins.list[TrainingLog]:
        """The newest `limit` log rows (optionally of one event type), oldest first."""
        query = select(TrainingLog).where(TrainingLog.job_id == job_id)
        if log_type:
            query = query.where(TrainingLog.event_type == log_type)
        rows = list(self.session.scalars(query.order_by(TrainingLog.id.desc()).limit(limit)).all())
        return rows[::-1]

    # The checkpoint look-ups do not autoflush. They select on a job's id (and kind), which never change;
    # `add_checkpoint` flushes a new row at once; a loaded row's unflushed changes are what the
    # identity map hands back. So flushing first changes nothing in the answer, but it flushed every
    # dirty job of the projector's batch once per completion or checkpoint event: 37 % of the API's CPU
    # while 1,000 queued jobs drained (py-spy --gil, bench scale).

    def checkpoint(self, job_id: str, kind: str) -> Checkpoint | None:
        """A job's checkpoint of one kind."""
        with self.session.no_autoflush:
            return self.session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
            ).first()

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        """Every checkpoint row of a job."""
        with self.session.no_autoflush:
            query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.kind)
            return list(self.session.scalars(query))

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Stage a new checkpoint row."""
        self.session.add(checkpoint)
        self.session.flush()


# (job_id, attempt, seq): what makes a metric or log row, and the event it projects, unique.
SeqKey = tuple[str, int, int]
SEQ_KEY_COLUMNS = ("job_id", "attempt", "seq")


class SeqKeyedRows:
    """The metric and log rows of one batch of events, added once each and inserted together.

    Whether a row is applied already is answered from the keys read once per batch (`expect`)
    plus the rows added since, not by one INSERT per event whose rowcount says so: that
    statement per event was most of the projector's time (profiled). `write()` must run in the
    transaction before it commits; rows of an event rolled back are forgotten with `discard()`.
    Like every repository it never commits.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        # Per table: the keys whose state is known (read, or added here), and those of them applied.
        self._known: dict[type[Any], set[SeqKey]] = {TrainingMetric: set(), TrainingLog: set()}
        self._applied: dict[type[Any], set[SeqKey]] = {TrainingMetric: set(), TrainingLog: set()}
        self._pending: dict[type[Any], list[dict[str, Any]]] = {TrainingMetric: [], TrainingLog: []}

    def expect(self, *, metrics: Iterable[SeqKey] = (), logs: Iterable[SeqKey] = ()) -> None:
        """Read which of these metric and log keys are applied already (one query per table)."""
        self._read_applied(TrainingMetric, metrics)
        self._read_applied(TrainingLog, logs)

    def add_metric_once(self, row: dict[str, Any]) -> bool:
        """Add a metric row unless its (job, attempt, seq) is applied; whether it was added."""
        return self._add_once(TrainingMetric, row)

    def add_log_once(self, row: dict[str, Any]) -> bool:
        """Add a log row unless its (job, attempt, seq) is applied; whether it was added."""
        return self._add_once(TrainingLog, row)

    def write(self) -> None:
        """Insert the rows added since the last write (one statement per table)."""
        if self.session.new:
            self.session.flush()  # a row may reference an object that is not in the database yet
        for model, rows in self._pending.items():
            if rows:
                # Ignoring duplicates is a second guard, not the check: a concurrent writer of the
                # same event (another replica after a redelivery) loses on the job's row version.
                table = model.__table__
                statement = insert_ignoring_duplicates(self.session, table, SEQ_KEY_COLUMNS)
                self.session.execute(table.insert() if statement is None else statement, rows)
                self._pending[model] = []

    def discard(self) -> None:
        """Forget the rows added since the last write (their event was rolled back)."""
        for model, rows in self._pending.items():
            self._applied[model].difference_update(_seq_key(row) for row in rows)
            self._pending[model] = []

    def _read_applied(self, model: type[Any], keys: Iterable[SeqKey]) -> None:
        seqs: dict[tuple[str, int], list[int]] = {}
        for job_id, attempt, seq in keys:
            seqs.setdefault((job_id, attempt), []).append(seq)
        if not seqs:
            return
        table: Table = model.__table__
        # Exactly the batch's keys (on the unique index), so a redelivered old event next to new
        # ones costs one more key, not every row in between.
        matching = or_(*(
            and_(table.c.job_id == job_id, table.c.attempt == attempt, table.c.seq.in_(wanted))
            for (job_id, attempt), wanted in seqs.items()
        ))
        found = self.session.execute(select(table.c.job_id, table.c.attempt, table.c.seq).where(matching))
        self._applied[model].update((job_id, attempt, seq) for job_id, attempt, seq in found)
        self._known[model].update((job_id, attempt, seq) for (job_id, attempt), asked in seqs.items() for seq in asked)

    def _add_once(self, model: type[Any], row: dict[str, Any]) -> bool:
        key = _seq_key(row)
        if key not in self._known[model]:
            self._read_applied(model, [key])  # a key the batch did not announce: ask for it alone
        applied = self._applied[model]
        if key in applied:
            return False
        applied.add(key)
        self._pending[model].append(row)
        return True


def _seq_key(row: dict[str, Any]) -> SeqKey:
    return (row["job_id"], row["attempt"], row["seq"])
