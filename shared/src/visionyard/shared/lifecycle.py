"""Running a service process: serve until SIGTERM/SIGINT, then let it drain and exit 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `serve(stop)` in a fresh event loop; SIGTERM or SIGINT sets `stop` instead of killing.

    A service must drain (finish or hand back what it holds, flush its NATS connection) when asked to
    stop, so the signals only set the event the service's loops watch.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(stop)

    asyncio.run(main())
