"""Stopping asyncio tasks for certain, on Python 3.11.

`task.cancel(); await task` is not enough there. `asyncio.wait_for` (nats-py's requests, publishes and
fetches all run under it) returns the result and drops the cancellation when the two arrive together, and
the task's loop goes on: its next wait never ends, and so neither does the `await task` of whoever stopped
it. Seen as a runner whose shutdown hung on a held message's heartbeat loop (a confirmed heartbeat is a
request), and before that as the API's scheduler hanging at one stop in two. Python 3.12's `wait_for`
no longer drops it; until then every loop that makes such calls is stopped with `cancel_all`.

No NATS import: held.py, the services' adapters and the CLI use it alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# How long a cancelled task has to end before it is cancelled again.
CANCEL_AGAIN_SECONDS = 1.0


async def cancel_all(tasks: Iterable[asyncio.Task[Any] | asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again any that is still running.

    What the tasks ended with (their cancellation, an error) is retrieved and dropped: they are being stopped.
    A cancellation of the caller still propagates.
    """
    tasks = [task for task in tasks if task is not None]
    for task in tasks:
        task.cancel()
    while pending := [task for task in tasks if not task.done()]:
        _, still = await asyncio.wait(pending, timeout=CANCEL_AGAIN_SECONDS)
        for task in still:
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at garbage collection
