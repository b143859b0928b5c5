"""The scheduling policy on its own (no I/O): priority, fair share, FIFO, quotas, devices, positions, fencing."""

from __future__ import annotations

from collections import Counter

import pytest

from visionyard.api.scheduling.policy import QueueBook, RunnerView, Waiting
from visionyard.shared.scheduling import AdmissionRecord, ProjectPolicy, parse_priority

NOW = 1_000.0


def book_with(*, slots: int = 4, gpus: int = 0, runners: int = 1) -> QueueBook:
    book = QueueBook()
    for index in range(runners):
        book.set_runner(f"r{index}", RunnerView(runner_id=f"r{index}", slots=slots, gpus=gpus, free_gpus=gpus,
                                                export_inference_held=0, every=5.0, seen_at=NOW))
    return book


def job(job_id: int, project: str = "1", *, priority: int = 50, at: float | None = None, gpus: int = 0,
        attempt: int = 1) -> Waiting:
    return Waiting(job_id=str(job_id), attempt=attempt, project_id=project, priority=priority,
                   queued_at=at if at is not None else float(job_id), gpus=gpus, revision=job_id)


def drain(book: QueueBook, count: int) -> list[str]:
    """Admit up to `count` jobs, ending each at once (so a slot is always free); the order they started."""
    started = []
    for _ in range(count):
        chosen = book.next_admission(NOW)
        if chosen is None:
            break
        book.admit(chosen, revision=1, now=NOW)
        book.ended(chosen.job_id, chosen.attempt, now=NOW)
        started.append(chosen.job_id)
    return started


def test_priorities_parse_by_name_or_integer_and_refuse_anything_else() -> None:
    assert [parse_priority(value) for value in ("low", "Normal", "HIGH", 7, "-3", 12.0)] == [0, 50, 100, 7, -3, 12]
    for bad in ("urgent", True, 1001, 2.5, None):
        with pytest.raises(ValueError):
            parse_priority(bad)


def test_higher_priority_starts_first_and_equal_priorities_keep_their_order() -> None:
    book = book_with(slots=1)
    for index, priority in enumerate([50, 0, 100, 50, 100, 0], start=1):
        book.offer(job(index, priority=priority))
    assert drain(book, 6) == ["3", "5", "1", "4", "2", "6"]


def test_a_high_priority_job_goes_before_normal_ones_queued_earlier_in_every_project() -> None:
    book = book_with(slots=1)
    for index in range(1, 9):
        book.offer(job(index, project=str(index % 2 + 1)))
    book.offer(job(9, project="2", priority=100))
    assert drain(book, 1) == ["9"]


def test_fair_share_splits_starts_by_weight_whatever_the_queue_depths() -> None:
    book = book_with(slots=1)
    book.set_policy("2", ProjectPolicy(weight=3))
    for index in range(1, 201):
        book.offer(job(index, project="1"))  # 200 queued first ...
    for index in range(201, 261):
        book.offer(job(index, project="2"))  # ... then 60 of a project with three times the weight
    started = drain(book, 80)
    counts = Counter("1" if int(job_id) <= 200 else "2" for job_id in started)
    assert counts == {"1": 20, "2": 60}
    # Both progress from the start: the small project does not wait behind the 200.
    assert {"1", "2"} == {"1" if int(job_id) <= 200 else "2" for job_id in started[:4]}


def test_an_idle_project_does_not_bank_starts_for_a_burst() -> None:
    book = book_with(slots=1)
    for index in range(1, 101):
        book.offer(job(index, project="1"))
    drain(book, 50)  # project 1 alone: its pass grows
    for index in range(101, 151):
        book.offer(job(index, project="2"))
    started = drain(book, 20)
    counts = Counter("1" if int(job_id) <= 100 else "2" for job_id in started)
    assert abs(counts["1"] - counts["2"]) <= 1  # alternate from now on; 2 does not get 50 in a row


def test_a_project_at_its_quota_waits_with_the_reason_while_others_start() -> None:
    book = book_with(slots=4)
    book.set_policy("1", ProjectPolicy(max_running_jobs=1))
    for index in range(1, 4):
        book.offer(job(index, project="1", priority=100))
    book.offer(job(4, project="2"))
    first = book.next_admission(NOW)
    assert first is not None and first.job_id == "1"
    book.admit(first, revision=1, now=NOW)
    # Project 1 holds its one allowed job: its high-priority jobs are not eligible, project 2's normal one is.
    second = book.next_admission(NOW)
    assert second is not None and second.job_id == "4"
    positions = book.positions(NOW)
    assert positions["2"].reason == "quota" and positions["2"].detail == "project 1 runs 1 of its 1 allowed job"
    assert positions["4"].reason == "capacity" and positions["4"].position == 1
    book.admit(second, revision=1, now=NOW)
    assert book.next_admission(NOW) is None  # slots are free, but project 1 is at its quota
    book.ended("1", 1, now=NOW)
    released = book.next_admission(NOW)
    assert released is not None and released.job_id == "2"


def test_gpu_jobs_wait_for_a_runner_with_the_devices_and_count_against_the_gpu_quota() -> None:
    book = book_with(slots=4, gpus=2)
    book.set_policy("1", ProjectPolicy(max_gpus=2))
    book.offer(job(1, gpus=4))
    book.offer(job(2, gpus=2))
    book.offer(job(3, gpus=1))
    book.offer(job(4))
    positions = book.positions(NOW)
    assert positions["1"].reason == "no_device" and "no runner has 4 GPUs" in positions["1"].detail
    chosen = book.next_admission(NOW)
    assert chosen is not None and chosen.job_id == "2"
    book.admit(chosen, revision=1, now=NOW)
    # Its 2 GPUs are reserved until it starts, and they are the project's whole GPU quota.
    assert book.positions(NOW)["3"].reason == "quota"
    assert [book.next_admission(NOW).job_id] == ["4"]  # type: ignore[union-attr]


def test_no_runner_is_a_reason_too_and_nothing_is_admitted() -> None:
    book = QueueBook()
    book.offer(job(1))
    assert book.next_admission(NOW) is None
    assert book.positions(NOW)["1"].reason == "no_runner"
    # A runner that stopped renewing its advertisement no longer counts.
    book.set_runner("r", RunnerView(runner_id="r", slots=2, gpus=0, free_gpus=0, export_inference_held=0, every=5.0, seen_at=NOW))
    assert book.next_admission(NOW + 10) is not None
    assert book.next_admission(NOW + 30) is None


def test_positions_follow_the_order_jobs_will_start_in_with_an_estimate_from_the_start_rate() -> None:
    book = book_with(slots=2)
    for index in range(1, 5):
        book.offer(job(index, project="1"))
    for index in range(5, 7):
        book.offer(job(index, project="2", priority=100))
    drain(book, 2)  # two starts in the window: a rate, and jobs 5 and 6 gone
    for _ in (1, 2):  # two more started and still running: every slot busy
        chosen = book.next_admission(NOW)
        assert chosen is not None
        book.admit(chosen, revision=1, now=NOW)
    book.started("1", 1)
    positions = book.positions(NOW)
    waiting = sorted((p.position, job_id) for job_id, p in positions.items() if p.position)
    assert waiting == [(1, "3"), (2, "4")]
    assert (positions["3"].reason, positions["4"].reason) == ("capacity", "priority")
    assert positions["4"].jobs_ahead == 1 and positions["4"].estimated_start_seconds is not None
    assert positions["4"].estimated_start_seconds > positions["3"].estimated_start_seconds  # type: ignore[operator]
    # Admitted but not started yet: handed to the runners.
    assert positions["2"].reason == "dispatching" and positions["2"].position == 0 and "1" not in positions


def test_a_priority_change_moves_a_job_and_keeps_its_queue_time() -> None:
    book = book_with(slots=1)
    for index in range(1, 4):
        book.offer(job(index))
    book.offer(Waiting(job_id="3", attempt=1, project_id="1", priority=100, queued_at=3.0, gpus=0, revision=10))
    assert drain(book, 3) == ["3", "1", "2"]


def test_stale_attempts_and_old_ends_are_fenced() -> None:
    book = book_with(slots=2)
    book.load_record(AdmissionRecord(job_id="7", attempt=2, project_id="1", state="admitted", admitted_at=NOW),
                     revision=5)
    assert not book.offer(job(7, attempt=2))  # admitted already: its request is stale
    assert book.ended("7", 1, now=NOW) is None  # the end of an older attempt frees nothing
    ended = book.ended("7", 3, now=NOW)  # a failover's later attempt ended: the admission is over
    assert ended is not None and ended.record_revision == 5 and not book.admitted
    assert not book.offer(job(7, attempt=3)) and book.offer(job(7, attempt=4))
    # A job cancelled while it waited: its end withdraws the request.
    book.offer(job(8))
    cancelled = book.ended("8", 1, now=NOW)
    assert cancelled is not None and cancelled.request_revision == 8 and "8" not in book.waiting


def test_queue_summary_counts_waiting_jobs_by_queue_project_and_priority() -> None:
    book = book_with(slots=1, gpus=1)
    book.offer(job(1, project="1", priority=100))
    book.offer(job(2, project="1"))
    book.offer(job(3, project="2", gpus=1))
    chosen = book.next_admission(NOW)
    assert chosen is not None
    book.admit(chosen, revision=1, now=NOW)
    summary = book.summary(NOW, scheduler="s")
    by_queue = {queue.queue: queue for queue in summary.queues}
    cpu = {p.project_id: p for p in by_queue["cpu"].projects}
    assert (by_queue["cpu"].waiting, by_queue["cpu"].running) == (1, 1)
    assert cpu["1"].by_priority == {"50": 1} and cpu["1"].running == 1
    assert by_queue["gpu-1"].waiting == 1 and summary.capacity.free_slots == 0


def test_lookahead_admits_ahead_of_free_slots_only_while_slots_turn_over_fast() -> None:
    book = book_with(slots=1, runners=2)  # two runners of one slot
    book.start(NOW - 10)
    for index in range(1, 40):
        book.offer(job(index))
    for _ in range(2):  # both slots taken
        chosen = book.next_admission(NOW)
        assert chosen is not None
        book.admit(chosen, revision=1, now=NOW)
    assert book.lookahead(NOW) == 0 and book.next_admission(NOW) is None  # nothing ended yet: strict
    # Short jobs: 30 attempts ended in the last 10 s (3/s): half a second of turnover is one job ahead.
    for index in range(30):
        book._ends.append(NOW - index * 0.3)
    assert book.lookahead(NOW) == 1
    ahead = book.next_admission(NOW)
    assert ahead is not None
    book.admit(ahead, revision=1, now=NOW)
    assert book.next_admission(NOW) is None  # one ahead at most at this turnover
    # Faster turnover, but never more than one per live runner.
    for index in range(200):
        book._ends.append(NOW - index * 0.01)
    assert book.lookahead(NOW) == 2
    # Long jobs (under 2 ends per second over the window): strict again.
    slow = book_with(slots=1)
    slow.start(NOW - 10)
    for index in range(15):
        slow._ends.append(NOW - index * 0.6)
    assert slow.lookahead(NOW) == 0
