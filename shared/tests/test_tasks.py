"""`cancel_all`: a task stopped by it ends, although Python 3.11's `wait_for` can drop a cancellation."""

from __future__ import annotations

import asyncio

from visionyard.shared.tasks import cancel_all


async def test_cancel_all_cancels_again_a_task_that_lost_its_first_cancellation() -> None:
    swallowed, waiting = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as a wait_for racing its result drops the cancel (Python 3.11)
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await waiting.wait()  # cancelled inside its first wait, not before it started
    await asyncio.wait_for(cancel_all([task]), 10)
    assert swallowed.is_set() and task.cancelled()


async def test_a_loop_of_wait_for_calls_is_stopped_when_the_cancel_races_an_answer() -> None:
    answers: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
    calls = 0

    async def requesting() -> None:  # a loop of requests, as nats-py makes them
        nonlocal calls
        while True:
            calls += 1
            answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            answers.put_nowait(answer)
            await asyncio.wait_for(answer, timeout=30)

    task = asyncio.create_task(requesting())
    first = await answers.get()
    first.set_result(None)  # answered, its waiter not yet woken: the cancel below arrives with the answer
    await asyncio.wait_for(cancel_all([task]), 10)
    assert task.done()


async def test_a_task_that_fails_while_stopping_is_stopped_without_raising_to_the_caller() -> None:
    started = asyncio.Event()

    async def failing() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("failed while stopping")

    task = asyncio.create_task(failing())
    await started.wait()
    await asyncio.wait_for(cancel_all([task]), 10)
    assert isinstance(task.exception(), RuntimeError)
