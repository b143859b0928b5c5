"""The outbox relay: publishes committed outbox rows to JetStream, in id order, awaiting each PubAck.

A use case writes its messages into the `outbox` table in the same transaction as its state change,
so a message exists if and only if the change was committed. The relay then publishes the rows and
marks them sent. If the broker is away the rows simply wait; a row published but not yet marked sent
(crash in between) is published again and de-duplicated by JetStream through its `Nats-Msg-Id`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from visionyard.api.db.models import utcnow
from visionyard.api.db.session import reading
from visionyard.api.outbox.repository import OutboxRepository

log = logging.getLogger("visionyard.api.outbox")


class RawPublisher(Protocol):
    """The part of the bus the relay needs."""

    def publish_raw(
        self, subject: str, data: bytes, *, message_id: str, headers: dict[str, str] | None = None
    ) -> Awaitable[Any]:
        """Publish bytes with a message id, resolving once the broker stored them."""
        ...


class OutboxRelay:
    """Publishes unsent outbox rows; `kick()` (thread-safe) wakes it right after a commit."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        publisher: RawPublisher,
        poll_seconds: float = 0.5,
        batch: int = 200,
        publish_timeout: float = 15.0,
    ) -> None:
        self._session_factory = session_factory
        self._publisher = publisher
        self._poll_seconds = poll_seconds
        self._batch = batch
        self._publish_timeout = publish_timeout
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.backlog = 0
        self.published = 0

    def kick(self) -> None:
        """Wake the relay now; callable from any thread (request handlers commit in worker threads)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set, waking on each kick or every poll interval."""
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            try:
                sent = await asyncio.to_thread(self.relay_once)
            except Exception as error:  # broker or database away: the rows wait, nothing is lost
                log.warning("outbox relay pass failed: %s", error)
                sent = 0
            if sent >= self._batch:
                continue  # more may be waiting; do not sleep on a backlog
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=self._poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()

    def relay_once(self) -> int:
        """Publish one batch of unsent rows (runs in a worker thread); how many were published."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("relay_once needs the relay's event loop; call run() first")
        sent = 0
        # The rows stay locked (FOR UPDATE SKIP LOCKED on PostgreSQL) until this transaction ends,
        # so another API replica's relay skips them instead of publishing them too.
        with self._session_factory() as session, session.begin():
            outbox = OutboxRepository(session)
            rows = outbox.unsent(limit=self._batch)
            for row in rows:
                future = asyncio.run_coroutine_threadsafe(
                    _await(self._publisher.publish_raw(
                        row.subject, row.payload, message_id=row.message_id, headers=dict(row.headers or {}) or None
                    )),
                    loop,
                )
                try:
                    future.result(timeout=self._publish_timeout)
                except Exception as error:
                    future.cancel()
                    # Keep id order: stop at the first failure and commit what did get stored.
                    log.warning("outbox publish failed; will retry", extra={"subject": row.subject, "error": str(error)})
                    break
                outbox.mark_sent(row, utcnow())
                sent += 1
        self.published += sent
        return sent

    def count_backlog(self) -> int:
        """How many rows wait to be published (for the metrics gauge)."""
        with reading(self._session_factory) as session:
            self.backlog = OutboxRepository(session).backlog()
        return self.backlog


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
