"""Checkpoint cadence: at most one checkpoint of a kind staged per interval, the newest, and what it supersedes deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

from visionyard.runner.cadence import CheckpointCadence, CheckpointReported


def reported(path: Path, kind: str = "last", order: int = 0) -> CheckpointReported:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return CheckpointReported(kind=kind, path=path, epoch=order + 1, order=order)


async def test_cadence_holds_only_the_newest_of_a_kind_and_deletes_the_copies_it_supersedes(tmp_path: Path) -> None:
    staged: list[CheckpointReported] = []
    outbox = tmp_path / "outbox"
    cadence = CheckpointCadence(staged.append, interval=3600, outbox=outbox)
    first, second, third = (reported(outbox / f"{n}-last.pt", order=n) for n in range(3))
    best = reported(outbox / "3-best.pt", kind="best", order=3)
    cadence.offer(first)
    cadence.offer(second)
    cadence.offer(best)  # another kind has its own interval
    cadence.offer(third)
    assert staged == [first, best]
    assert not second.path.exists() and third.path.exists() and cadence.superseded == 1
    cadence.flush()
    assert staged == [first, best, third]


async def test_cadence_releases_a_held_checkpoint_when_its_interval_is_up(tmp_path: Path) -> None:
    staged: list[CheckpointReported] = []
    cadence = CheckpointCadence(staged.append, interval=0.05, outbox=tmp_path)
    first, second = reported(tmp_path / "a.pt"), reported(tmp_path / "b.pt", order=1)
    cadence.offer(first)
    cadence.offer(second)
    assert staged == [first]
    for _ in range(200):  # no flush: the timer alone passes it on
        if len(staged) == 2:
            break
        await asyncio.sleep(0.01)
    assert staged == [first, second]


async def test_cadence_zero_passes_every_checkpoint_and_never_deletes_a_trainer_owned_path(tmp_path: Path) -> None:
    staged: list[CheckpointReported] = []
    cadence = CheckpointCadence(staged.append, interval=0, outbox=tmp_path / "outbox")
    same = [reported(tmp_path / "output" / "last.pt", order=n) for n in range(3)]
    for item in same:
        cadence.offer(item)
    assert staged == same and same[0].path.exists()


async def test_a_closed_cadence_stages_nothing_it_still_held(tmp_path: Path) -> None:
    staged: list[CheckpointReported] = []
    cadence = CheckpointCadence(staged.append, interval=0.02, outbox=tmp_path)
    first, second = reported(tmp_path / "a.pt"), reported(tmp_path / "b.pt", order=1)
    cadence.offer(first)
    cadence.offer(second)
    cadence.close()
    await asyncio.sleep(0.1)  # well past the interval: a live timer would have passed `second` on
    assert staged == [first]
