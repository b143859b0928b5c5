"""The restart policy of `visionyard up` (backoff, crash loop, recovery) and what `visionyard status` prints."""

from __future__ import annotations

import os
import time
from pathlib import Path

from visionyard.cli.stackstate import (
    ProcessState,
    StackState,
    describe_status,
    process_start_ticks,
    read_state,
    write_state,
)
from visionyard.cli.supervision import RestartPolicy, RestartRecord

POLICY = RestartPolicy(first_delay=0.5, max_delay=4.0, stable_after=30.0, crash_loop_exits=4, crash_loop_window=60.0)


def test_backoff_doubles_with_quick_exits_up_to_the_cap() -> None:
    record = RestartRecord(policy=POLICY)
    record.started(0.0)
    delays = []
    now = 0.0
    for _ in range(6):
        now += 1.0  # a one-second run each time
        record.exited(code=1, now=now)
        assert record.restart_at is not None
        delays.append(record.restart_at - now)
        now = record.restart_at
        assert record.due(now) and not record.due(now - 0.01)
        record.restarting(now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert record.restarts == 6


def test_a_long_run_resets_the_backoff() -> None:
    record = RestartRecord(policy=POLICY)
    record.started(0.0)
    for now in (1.0, 2.0, 4.0):
        record.exited(code=1, now=now)
        record.restarting(record.restart_at or now)
    record.exited(code=-9, now=100.0)  # after a run longer than stable_after
    assert record.restart_at == 100.5


def test_a_crash_loop_is_flagged_once_then_cleared_after_a_stable_run() -> None:
    record = RestartRecord(policy=POLICY)
    record.started(0.0)
    entered = []
    now = 0.0
    for _ in range(6):
        now += 0.1
        entered.append(record.exited(code=3, now=now))
        assert record.state() in ("restarting", "crash-looping")
        now = record.restart_at or now
        record.restarting(now)
    assert entered == [False, False, False, True, False, False]
    assert record.state() == "crash-looping" and record.last_exit_code == 3
    assert not record.recovered(now + 29.0)
    assert record.recovered(now + 30.0)
    assert record.state() == "running" and not record.recovered(now + 31.0)


def test_exits_spread_wider_than_the_window_are_no_crash_loop() -> None:
    record = RestartRecord(policy=POLICY)
    record.started(0.0)
    now = 0.0
    for _ in range(8):
        now += 25.0  # below stable_after, but four exits never fit in 60 s
        assert not record.exited(code=1, now=now)
        record.restarting(record.restart_at or now)
    assert not record.crash_looping


def _state(tmp_path: Path, *, pid: int, processes: list[ProcessState]) -> StackState:
    return StackState(pid=pid, start_ticks=process_start_ticks(pid), started_at=time.time(), data_dir=str(tmp_path),
                      api_url="http://127.0.0.1:8000", nats_url="nats://127.0.0.1:4222",
                      tracking_uri="sqlite:///x", logs_dir=str(tmp_path / "logs"), processes=processes)


def test_status_shows_each_process_and_flags_a_crash_loop(tmp_path: Path) -> None:
    me = os.getpid()
    processes = [
        ProcessState(name="nats-server", state="running", pid=me, start_ticks=process_start_ticks(me), restarts=0,
                     log="n.log"),
        ProcessState(name="storage", state="crash-looping", pid=None, start_ticks=None, restarts=7, log="s.log",
                     last_exit_code=3, last_exit_at=time.time()),
    ]
    write_state(tmp_path / "stack.json", _state(tmp_path, pid=me, processes=processes))
    state = read_state(tmp_path / "stack.json")
    assert state is not None and state.alive
    text, code = describe_status(state, tmp_path)
    assert code == 1
    lines = {line.split()[0]: line.split() for line in text.splitlines()[6:]}
    assert lines["nats-server"][1:4] == ["running", str(me), "0"]
    assert lines["storage"][1:4] == ["crash-looping", "-", "7"] and "code 3" in " ".join(lines["storage"])


def test_status_without_a_stack_or_with_a_dead_up_says_so(tmp_path: Path) -> None:
    text, code = describe_status(read_state(tmp_path / "stack.json"), tmp_path)
    assert code == 3 and "no Visionyard stack is running" in text
    # A recorded `up` pid that now belongs to another process (start time differs) is not taken for a stack.
    me = os.getpid()
    state = _state(tmp_path, pid=me, processes=[])
    state.start_ticks = (state.start_ticks or 0) + 1
    write_state(tmp_path / "stack.json", state)
    text, code = describe_status(read_state(tmp_path / "stack.json"), tmp_path)
    assert code == 3 and f"(pid {me}) is gone" in text and "none of the processes" in text
