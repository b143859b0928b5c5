"""The runner's ports: what its use cases (`service.py`, `export_inference.py`) need from the world.

`main.py` fills them with the NATS, object-store and subprocess adapters (`adapters/`); the tests fill
them with fakes. No framework import here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from visionyard.shared.commands import DatasetRef
from visionyard.shared.events import JobEvent
from visionyard.shared.messages import Message

# -- what a training attempt hands its event sink ---------------------------------------------------


@dataclass(frozen=True)
class CheckpointDeclared:
    """A checkpoint the trainer declared; the publisher stages the file, then publishes `CheckpointStaged`."""

    job_id: str
    attempt: int
    seq: int
    kind: str
    path: Path
    epoch: int | None

    @property
    def object_name(self) -> str:
        """Staging object name: `ckpt/<job_id>/<attempt>/<seq>-<kind>.pt`."""
        return f"ckpt/{self.job_id}/{self.attempt}/{self.seq}-{self.kind}.pt"


Outgoing = JobEvent | CheckpointDeclared


# -- staging, spawning, publishing, the KV ledgers ------------------------------------------------


@dataclass(frozen=True)
class StagedCheckpoint:
    """A stored checkpoint fetched to a local file."""

    path: Path
    epoch: int | None


class Stager(Protocol):
    """Fetches datasets and checkpoints from storage."""

    async def stage_dataset(self, dataset: DatasetRef) -> Path:
        """A local directory holding the extracted dataset version."""
        ...

    async def stage_checkpoint(self, job_id: str, kind: str, destination: Path) -> StagedCheckpoint | None:
        """The job's stored checkpoint of `kind` copied to `destination`, or None if there is none."""
        ...


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start a trainer process."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]


class TrainerHandle(Protocol):
    """A running trainer process group."""

    pid: int

    def lines(self) -> AsyncIterator[tuple[str, str]]:
        """(`sdk`|`stdout`|`stderr`, line) until every stream is closed."""
        ...

    async def wait(self) -> int:
        """The exit status once the process ends (negative: killed by that signal)."""
        ...

    async def stop(self, *, grace: float) -> int:
        """SIGTERM the group, SIGKILL it after `grace`, reap; no member of the group survives."""
        ...


class TrainerLauncher(Protocol):
    """Starts trainers."""

    async def launch(self, spec: LaunchSpec) -> TrainerHandle:
        """Start the process described by `spec`."""
        ...


class EventSink(Protocol):
    """Ordered, retrying publication; `emit` never blocks the trainer."""

    def emit(self, item: Outgoing) -> None:
        """Queue an event (or a checkpoint to stage, then announce)."""
        ...

    async def drain(self) -> None:
        """Wait until everything emitted so far is acknowledged by the broker."""
        ...

    async def close(self) -> None:
        """Stop the publisher task."""
        ...


class CancellationLedger(Protocol):
    """The durable record of cancel requests (KV `job_cancellations`)."""

    async def cancelled_attempt(self, job_id: str) -> int | None:
        """The attempt a cancel was recorded for, or None."""
        ...


class TerminalLedger(Protocol):
    """The durable record of finished jobs (KV `job_terminal`), written by the API."""

    async def terminal_attempt(self, job_id: str) -> int | None:
        """The attempt at which the job reached a terminal status, or None."""
        ...



class EventPublisher(Protocol):
    """Publishes an export's or inference's events and stages the files they announce."""

    async def publish(self, message: Message) -> Any:
        """Publish awaiting the broker's acknowledgement."""
        ...

    async def put_file(self, name: str, path: Path) -> tuple[str, int]:
        """Stage a local file in the staging object store; returns (sha256, size)."""
        ...


class ObjectStager(Protocol):
    """Fetches stored objects (inference inputs) by the URI storage issued."""

    async def stage_object(self, uri: str, destination: Path) -> Path:
        """The object at `uri` copied to `destination`."""
        ...


class CancelRequests(Protocol):
    """Where the cancellation watcher forwards a recorded cancel (the held jobs)."""

    def request_cancel(self, job_id: str, attempt: int) -> bool:
        """Stop the held job if the cancel is for its attempt or a newer one; whether one was stopped."""
        ...
