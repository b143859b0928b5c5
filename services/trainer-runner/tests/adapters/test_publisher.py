"""The runner's event publisher against a real nats-server: a large checkpoint is announced to storage
(with the id its chunks are put under) before it is staged; a small one is not."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from visionyard.runner.adapters import publisher as publisher_module
from visionyard.runner.adapters.publisher import JetStreamEventPublisher
from visionyard.runner.ports import CheckpointDeclared
from visionyard.shared import subjects
from visionyard.shared.bus import Bus
from visionyard.shared.events import CheckpointStaged
from visionyard.shared.requests import CheckpointIncoming

pytestmark = pytest.mark.integration


async def test_a_large_checkpoint_is_announced_before_it_is_staged_and_a_small_one_is_not(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "INCOMING_CHECKPOINT_MIN_BYTES", 1_000_000)
    hints = await bus.nc.subscribe(subjects.STORAGE_CHECKPOINT_INCOMING)
    staged = await bus.nc.subscribe(subjects.EVT_JOB_CHECKPOINT)
    big, small = tmp_path / "big.pt", tmp_path / "small.pt"
    big.write_bytes(os.urandom(3_000_000))
    small.write_bytes(os.urandom(1000))
    publisher = JetStreamEventPublisher(bus)
    try:
        publisher.emit(CheckpointDeclared(job_id="job1", attempt=1, seq=1, kind="best", path=big, epoch=1))
        publisher.emit(CheckpointDeclared(job_id="job1", attempt=1, seq=2, kind="last", path=small, epoch=1))
        await asyncio.wait_for(publisher.drain(), 30)
    finally:
        await publisher.close()

    hint = CheckpointIncoming.model_validate_json((await hints.next_msg(timeout=5)).data)
    first = CheckpointStaged.model_validate_json((await staged.next_msg(timeout=5)).data)
    second = CheckpointStaged.model_validate_json((await staged.next_msg(timeout=5)).data)
    assert (hint.object_name, hint.size_bytes) == (first.object_name, 3_000_000)
    # The hint names the chunks the object was put under, so a reader can follow the put.
    info = await (await bus.object_store()).get_info(first.object_name)
    assert info.nuid == hint.object_id
    with pytest.raises(NatsTimeoutError):  # nothing announced for the small one
        await hints.next_msg(timeout=0.5)
    assert second.size_bytes == 1000
