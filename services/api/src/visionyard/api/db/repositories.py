"""Repositories: queries and writes over one session. They never commit; the unit of work does."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from visionyard.api.db.models import (
    Checkpoint,
    Dataset,
    DatasetVersion,
    OutboxMessage,
    TrainingJob,
    TrainingLog,
    TrainingMetric,
    utcnow,
)
from visionyard.shared import tracing
from visionyard.shared.messages import Message


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

    def metrics(self, job_id: str, *, limit: int, newest: bool = False) -> list[TrainingMetric]:
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

    def logs(self, job_id: str, *, limit: int, log_type: str | None) -> list[TrainingLog]:
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

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
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
                statement = _insert_ignoring_duplicates(self.session, table, SEQ_KEY_COLUMNS)
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


class DatasetRepository:
    """Datasets and their immutable versions."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, dataset: Dataset) -> None:
        """Stage a new dataset."""
        self.session.add(dataset)

    def get(self, dataset_id: str) -> Dataset | None:
        """One dataset."""
        return self.session.get(Dataset, dataset_id)

    def list(self) -> Sequence[Dataset]:
        """Every dataset, newest first."""
        return self.session.scalars(select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id)).all()

    def delete(self, dataset: Dataset) -> None:
        """Remove a dataset and its versions."""
        self.session.execute(delete(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id))
        self.session.delete(dataset)

    def versions(self, dataset_id: str) -> Sequence[DatasetVersion]:
        """A dataset's versions, oldest first."""
        return self.session.scalars(
            select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id).order_by(DatasetVersion.id)
        ).all()

    def add_version_once(self, *, dataset_id: str, content_hash: str, stats: dict[str, Any]) -> bool:
        """Record a version unless it exists (versions are immutable); whether it was new."""
        return _insert_ignoring_duplicate(
            self.session,
            DatasetVersion,
            {"dataset_id": dataset_id, "content_hash": content_hash, "stats": stats, "created_at": utcnow()},
            ("dataset_id", "content_hash"),
        )


# Set in `Session.info` when a transaction queued outbox rows: whoever commits it knows to wake the relay.
OUTBOX_QUEUED = "visionyard.outbox_queued"


class OutboxRepository:
    """Messages waiting to be published."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, message: Message, *, subject: str | None = None) -> None:
        """Queue a bus message, published on its own subject (or `subject`)."""
        target = subject or _subject_of(message)
        self.add_raw(subject=target, payload=message.to_bytes(), message_id=message.message_id)

    def add_raw(self, *, subject: str, payload: bytes, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Queue raw bytes (e.g. a KV put on `$KV.<bucket>.<key>`)."""
        self.session.info[OUTBOX_QUEUED] = True
        # The trace context of the request (or event) that wrote the row travels with the message.
        headers = tracing.inject(headers) if tracing.enabled() else (headers or {})
        self.session.add(OutboxMessage(message_id=message_id, subject=subject, payload=payload, headers=headers))

    def add_kv_put(self, *, bucket: str, key: str, value: dict[str, Any], message_id: str) -> None:
        """Queue a durable KV write."""
        self.add_raw(subject=f"$KV.{bucket}.{key}", payload=json.dumps(value).encode(), message_id=message_id)

    def unsent(self, *, limit: int) -> list[OutboxMessage]:
        """The oldest unsent rows, locked so another API replica skips them (PostgreSQL)."""
        query = select(OutboxMessage).where(OutboxMessage.sent_at.is_(None)).order_by(OutboxMessage.id).limit(limit)
        if self.session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        return list(self.session.scalars(query).all())

    def backlog(self) -> int:
        """How many rows wait to be published."""
        return self.session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
        ) or 0

    def mark_sent(self, row: OutboxMessage, at: datetime) -> None:
        """Record that the broker stored a row's message."""
        row.sent_at = at


def _subject_of(message: Message) -> str:
    subject = getattr(message, "subject", None)
    if callable(subject):
        return str(subject())
    if isinstance(subject, str):
        return subject
    raise TypeError(f"{type(message).__name__} has no subject")


def _insert_ignoring_duplicates(session: Session, table: Table, keys: tuple[str, ...]) -> Any:
    """An INSERT of `table` that skips rows whose unique `keys` exist; None on other dialects than ours."""
    # A Core insert on the table with the rows as parameters (not ORM `.values(...)`) skips the ORM
    # bulk path and the autoflush of every dirty object, and on SQLite `INSERT OR IGNORE` (unlike the
    # dialect's `on_conflict_do_nothing`, which SQLAlchemy never caches) compiles once (profiled).
    # The unique key is the only constraint these rows can violate (the caller fills every column).
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing(index_elements=list(keys))
    if dialect == "sqlite":
        return table.insert().prefix_with("OR IGNORE")
    return None


def _insert_ignoring_duplicate(session: Session, model: type[Any], row: dict[str, Any], keys: tuple[str, ...]) -> bool:
    statement = _insert_ignoring_duplicates(session, model.__table__, keys)
    if statement is None:  # pragma: no cover - other dialects check first
        existing = session.scalars(select(model).filter_by(**{key: row[key] for key in keys})).first()
        if existing is not None:
            return False
        session.add(model(**row))
        session.flush()
        return True
    if session.new:
        session.flush()  # this row may reference an object that is not in the database yet
    result = session.execute(statement, row)
    return bool(result.rowcount)
