"""Durable pull consumers: the standing pull (the fast path every JetStream subscriber runs on), the claimer
(one message when asked), and dead-lettering. Settling is the subscribers' middleware's (`broker.settling`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT

from visionyard.shared import metrics, streams, subjects
from visionyard.shared.bus.publish import Publishing
from visionyard.shared.tasks import cancel_all

log = logging.getLogger("visionyard.bus")


# How late a request's expiry (408) may be before the request is taken for lost.
PULL_GRACE_SECONDS = 2.0
# How often a standing pull checks for a reconnect (which loses its requests if the server restarted).
PULL_WATCH_SECONDS = 1.0
# The pause before asking again after a refused request (409, 503) or a failed publish.
PULL_RETRY_SECONDS = 0.5
# The server's count of a request's messages it will no longer send (on a 408).
PENDING_MESSAGES_HEADER = "Nats-Pending-Messages"


class Consuming(Publishing):
    """The standing pull and the claimer over durable consumers, and the dead-letter stream."""

    async def pull_loop(
        self,
        spec: streams.ConsumerSpec,
        on_messages: Callable[[list[Msg]], Awaitable[None]],
        *,
        stop: asyncio.Event,
        batch: int,
        linger: float = 0.0,
    ) -> None:
        """Pull from `spec`'s durable consumer until `stop` is set, handing `on_messages` up to `batch` at a time.

        A batch is what has arrived by the time the handler is free. With `linger` > 0, a partial batch waits
        up to that many seconds for more messages first: for a handler whose cost is per call rather than per
        message (one MLflow `log_batch` per call), a trickle of events then costs one call per `linger` instead
        of one per event. Messages stay unacknowledged meanwhile (`linger` ≪ ack wait).

        `on_messages` settles what it is given (what feeds a FastStream subscriber, `broker.pulled`, leaves that
        to the subscriber's settling middleware); if it raises, the pull goes on after a pause and the ack wait
        redelivers what it left unsettled.
        """
        pull = _StandingPull(
            self.nc,
            f"{self.js._prefix}.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}",
            durable=spec.durable,
            batch=batch,
            expires=self.pull_expires,
        )
        await pull.start(stop)
        metrics.CONSUMERS.track(self, spec)
        try:
            while not stop.is_set():
                messages = await pull.take(linger=linger)
                if not messages:
                    continue
                try:
                    await on_messages(messages)
                except Exception as error:  # settling failed (broker away): ack_wait redelivers the rest
                    log.warning("handling a batch from %s failed: %s", spec.durable, error)
                    await asyncio.sleep(PULL_RETRY_SECONDS)
                finally:
                    pull.release(len(messages))
        finally:
            metrics.CONSUMERS.untrack(self, spec)
            await pull.close()

    async def claimer(self, spec: streams.ConsumerSpec) -> Claimer:
        """A `Claimer` of `spec`'s durable consumer."""
        return Claimer(await self.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream))

    async def dead_letter(self, msg: Msg, *, consumer: str, reason: str) -> None:
        """Park a poison message in the DEADLETTERS stream, keeping its subject and the reason."""
        stream_seq = msg.metadata.sequence.stream if msg.metadata else 0
        await self.publish_raw(
            subjects.dead_letter(consumer),
            msg.data,
            message_id=f"dlq-{consumer}-{stream_seq}",
            headers={
                "Visionyard-Original-Subject": msg.subject,
                "Visionyard-Reason": reason[:1000],
                "Visionyard-Stream-Seq": str(stream_seq),
            },
        )


class _StandingPull:
    """One standing pull's requests, kept standing on the server, and what they delivered.

    Flow control as nats.go's `Consume`: the messages requested but not yet delivered plus those
    delivered but not yet handled never exceed `batch`, and a new request asks for the difference
    once that is half a batch. So nothing is pulled for a handler still busy with a whole batch (a
    checkpoint upload with `batch` 1): another replica takes the next message instead of it waiting
    in this client for the handler, its ack wait running.
    """

    def __init__(self, nc: NatsClient, next_subject: str, *, durable: str, batch: int, expires: float) -> None:
        self._nc = nc
        self._next_subject = next_subject
        self._durable = durable
        self._batch = batch
        self._threshold = max(1, batch // 2)
        self._expires_ns = int(expires * 1e9)
        self._lost_after = expires + PULL_GRACE_SECONDS
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._delivered: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        # Messages asked for and not yet delivered; delivered and not yet handled.
        self._owed = 0
        self._held = 0
        # When the server last answered (or was last asked), and the client's reconnect count then.
        self._heard = 0.0
        self._reconnects = 0
        self._retry_at = 0.0

    async def start(self, stop: asyncio.Event) -> None:
        """Subscribe to the inbox and start keeping a request standing."""
        self._stop = stop
        self._subscription = await self._nc.subscribe(
            self._inbox,
            cb=self._on_inbox,
            pending_msgs_limit=DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        )
        watcher = asyncio.create_task(stop.wait())
        watcher.add_done_callback(lambda _: self._arrived.set())
        self._tasks = [watcher, asyncio.create_task(self._keep_requesting(), name=f"pull-{self._durable}")]

    async def take(self, *, linger: float) -> list[Msg]:
        """The next messages for the handler, at most `batch`; empty once `stop` is set.

        Waits for the first; takes whatever else has arrived without waiting (a lone message is
        handled at once) or, with `linger` > 0, keeps collecting until the batch is full or
        `linger` seconds have passed since the first was taken.
        """
        assert self._stop is not None
        while not self._delivered:
            if self._stop.is_set():
                return []
            self._arrived.clear()
            await self._arrived.wait()
        messages = self._take_delivered(self._batch)
        if linger <= 0:
            return messages
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while len(messages) < self._batch and not self._stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
            messages += self._take_delivered(self._batch - len(messages))
        return messages

    def release(self, handled: int) -> None:
        """`handled` messages have been through the handler: room to ask for more."""
        self._held -= handled
        self._wake.set()

    async def close(self) -> None:
        """Stop requesting, unsubscribe, and nak what was delivered but never handled.

        The nak (no delay) hands those messages to another replica now rather than after the ack wait.
        """
        await cancel_all(self._tasks)
        assert self._subscription is not None
        # Draining (unsubscribe, then a round trip) receives what the server sent before it saw the
        # unsubscribe; a plain unsubscribe would drop those, and they would wait out the ack wait.
        # Without interest, the server drops the requests still standing instead of filling them.
        if self._nc.is_connected and not self._nc.is_draining:
            try:
                async with asyncio.timeout(PULL_GRACE_SECONDS):
                    await self._subscription.drain()  # type: ignore[no-untyped-call]  # nats-py leaves it untyped
            except Exception as error:  # the broker went away meanwhile: so did the requests
                log.info("could not drain the pull inbox of %s: %s", self._durable, error)
        else:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        if not self._delivered:
            return
        unhandled = self._take_delivered(len(self._delivered))
        log.info("returning %d unhandled messages of %s", len(unhandled), self._durable)
        with contextlib.suppress(Exception):
            for msg in unhandled:
                await msg.nak()
            await self._nc.flush(timeout=int(PULL_GRACE_SECONDS))

    def _take_delivered(self, count: int) -> list[Msg]:
        return [self._delivered.popleft() for _ in range(min(count, len(self._delivered)))]

    async def _on_inbox(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        # A JetStream message always has its ack subject as reply; a status (100, 404, 408, 409,
        # 503) never does, and is for this loop only: a handler never sees one.
        status = None if msg.reply else JetStreamContext.is_status_msg(msg)
        if status is None:
            self._owed = max(0, self._owed - 1)
            self._held += 1
            self._delivered.append(msg)
            self._arrived.set()
            return
        if status == api.StatusCode.CONTROL_MESSAGE:
            return
        if status in (api.StatusCode.REQUEST_TIMEOUT, api.StatusCode.NO_MESSAGES):
            # The request ended: whatever of it was not delivered will not be.
            unfilled = (msg.headers or {}).get(PENDING_MESSAGES_HEADER)
            self._owed = max(0, self._owed - int(unfilled)) if unfilled is not None else 0
        else:
            # Refused or dropped (409: too many waiting requests, leadership change, consumer
            # deleted; 503: no JetStream yet after a restart): which request is unknown, so all are
            # taken for lost and asked again after a pause.
            description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
            log.warning("pull request to %s refused: %s %s", self._durable, status, description)
            self._owed = 0
            self._retry_at = self._heard + PULL_RETRY_SECONDS
        self._wake.set()

    async def _keep_requesting(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                await self._request_more(loop.time())
            except Exception as error:  # broker away: ask again after a pause, never stop
                log.warning("pull request to %s failed: %s", self._durable, error)
                self._retry_at = loop.time() + PULL_RETRY_SECONDS
            pause = self._retry_at - loop.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause if 0 < pause < PULL_WATCH_SECONDS else PULL_WATCH_SECONDS):
                    await self._wake.wait()

    async def _request_more(self, now: float) -> None:
        if now < self._retry_at or not self._nc.is_connected:
            # A request buffered while disconnected could reach a server that has not recovered the
            # consumer yet, and would be counted on top of the one asked after the reconnect.
            return
        reconnected = self._nc.stats["reconnects"] != self._reconnects
        if self._owed and (reconnected or now - self._heard > self._lost_after):
            # A restarted server forgot the requests; one that answered nothing past the expiry lost them.
            log.info("pull requests to %s lost; asking again", self._durable)
            self._owed = 0
        room = self._batch - self._owed - self._held
        if room < self._threshold:
            return
        request = json.dumps({"batch": room, "expires": self._expires_ns}).encode()
        await self._nc.publish(self._next_subject, request, reply=self._inbox)
        self._owed += room
        self._heard = now
        self._reconnects = self._nc.stats["reconnects"]


class Claimer:
    """One message at a time from a durable consumer, only when asked: for a service that claims a command
    per free slot and holds it while the job runs (the runner), so a command is never pulled by a runner
    that cannot start it while another runner has room."""

    def __init__(self, subscription: Any) -> None:
        self._subscription = subscription

    async def claim(self, *, timeout: float) -> Msg | None:
        """The next message, or None when none came within `timeout`; raises when the broker is away."""
        try:
            messages = await self._subscription.fetch(1, timeout=timeout)
        except (TimeoutError, NatsTimeoutError):
            return None
        return messages[0] if messages else None

    async def close(self) -> None:
        """Stop claiming."""
        with contextlib.suppress(Exception):
            await self._subscription.unsubscribe()
