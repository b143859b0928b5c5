"""Each service's FastStream broker, on the bus's connection, and the middlewares every subscriber runs.

A service declares its handlers as FastStream subscribers (pydantic-typed; FastStream validates the
payload and serialises replies) with the three binders here, which add the house's middlewares:

- `responder`: core request-reply in a queue group; a failing handler answers the error's reason
  (`error_reply`) instead of leaving its caller to time out.
- `listener`: core hints in a queue group; a failing handler is logged (a hint's loss costs time only).
- `consumer`: a JetStream durable consumer with manual acknowledgement; `Settle` maps the outcome to
  an ack decision through `decide_ack` (ack, nak with backoff, or dead-letter and terminate), an invalid
  payload or an unknown schema version is dead-lettered with the reason.

Where they run: responders and listeners are FastStream's own core subscriptions. A durable consumer's
messages come from the bus's standing pull (`consume.py`) and are handed to the FastStream subscriber's
own `consume` — so the handler, its validation and its middlewares are FastStream's, while the pull is
the one that meets the bench figures (FastStream's pull fetches per call and holds a lone message until
its fetch deadline: bench/PROFILE.md, "FastStream pull consumers"). `TestNatsBroker` routes messages to
the same subscribers without a server, which is how the handlers' routing and validation are tested.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from faststream import BaseMiddleware, Context
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsRouter, NatsUserPassword, PullSub
from faststream.nats.message import NatsBatchMessage
from faststream.nats.subscriber.usecases.basic import LogicSubscriber
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from visionyard.shared import metrics, permissions, streams, tracing
from visionyard.shared.bus.errors import PermanentError, error_reply
from visionyard.shared.bus.settle import DeadLetters, settle
from visionyard.shared.config import nats_url_user, server_urls
from visionyard.shared.messages import SchemaVersionError
from visionyard.shared.tasks import cancel_all

if TYPE_CHECKING:
    from visionyard.shared.bus import Bus

log = logging.getLogger("visionyard.bus")

# What a `batched` consumer's handler takes: the batch's raw messages are `batch.raw_message` (each decoded,
# and any poison one dead-lettered, by the handler: one bad event must not hold back the rest).
Batch = Annotated[NatsBatchMessage, Context("message")]
# How long stopping waits for a feeder to end after its handler calls (a held job handed back, a long ingest).
STOP_GRACE_SECONDS = 60.0


class ServiceBroker(NatsBroker):
    """A service's FastStream broker: its subscribers, and the durable consumers the bus's pull feeds."""

    def __init__(self, *args: Any, service: str, access: permissions.ServiceAccess | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.service = service
        self.access = access
        # Set by `Bus.from_broker` (tests may set any `DeadLetters`): where `Settle` parks poison messages.
        self.dead_letters: DeadLetters | None = None
        self.bus: Bus | None = None
        self._fed: list[_Fed] = []
        # On a connection another part owns (`attached`): stopping leaves it open.
        self._borrowed = False

    async def start(self) -> None:
        """Connect, and start every subscriber; those of durable consumers run on the bus's standing pull."""
        if self.bus is None:
            raise RuntimeError("a ServiceBroker starts after Bus.from_broker(broker) connected it")
        for fed in self._fed:
            fed.install(self.bus)
        await super().start()

    async def stop_subscribers(self) -> None:
        """Stop every subscriber (each finishing its handler calls), leaving the connection for last publishes."""
        for subscriber in self.subscribers:
            await subscriber.stop()

    async def stop(self, *args: Any, **kwargs: Any) -> None:
        """Stop every subscriber (each finishing its handler calls), then drain the connection if it is ours."""
        if self._borrowed or (self._connection is not None and self._connection.is_closed):
            self._connection = None  # NatsBroker.stop drains the connection it holds (raising if it is closed)
        await super().stop(*args, **kwargs)


def attached(bus: Bus, *, service: str) -> ServiceBroker:
    """A broker on `bus`'s connection, which stays its owner's: stopping the broker stops its subscribers only.

    For a process that shares one connection between parts (tests hand the API their bus).
    """
    broker = service_broker("nats://attached.invalid", service=service)
    broker._connection = bus.nc
    broker.config.connect(bus.nc)
    broker._setup_logger()
    broker._borrowed = True
    broker.access = bus.access
    broker.bus = bus
    broker.dead_letters = bus
    return broker


# What feeds a subscriber its messages: given the bus, the subscriber (hand each message, or a batched one's
# list, to its `consume`) and the event that says stop; returns once it has stopped.
Feeder = Callable[["Bus", LogicSubscriber[Any], asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class _Fed:
    """A FastStream subscriber whose messages come from `feeder` instead of FastStream's own subscription."""

    subscriber: LogicSubscriber[Any]
    feeder: Feeder
    task: asyncio.Task[None] | None = None

    def install(self, bus: Bus) -> None:
        subscriber = self.subscriber
        halt = asyncio.Event()
        original_stop = subscriber.stop
        fed = self

        async def create_subscription(sub: LogicSubscriber[Any]) -> None:
            fed.task = asyncio.create_task(fed.feeder(bus, sub, halt), name="feed-subscriber")

        async def stop(sub: LogicSubscriber[Any]) -> None:
            # The feeder ends after the handler calls in progress (a consumer nak's what it pulled and did not
            # hand over, so another replica takes it now, not after the ack wait) before the connection drains.
            halt.set()
            if fed.task is not None:
                await asyncio.wait([fed.task], timeout=STOP_GRACE_SECONDS)
                if not fed.task.done():
                    log.warning("a subscriber's feeder did not stop within %.0fs; cancelling it", STOP_GRACE_SECONDS)
                    await cancel_all([fed.task])
                if not fed.task.cancelled() and fed.task.exception() is not None:
                    log.warning("feeding a subscriber ended with %r", fed.task.exception())
                fed.task = None
            await original_stop()

        # FastStream 0.7.8 (pinned) starts a subscriber's consumption in `_create_subscription`; the real-server
        # tests in shared/tests/bus/test_broker.py fail if that changes.
        subscriber._create_subscription = types.MethodType(create_subscription, subscriber)  # type: ignore[method-assign]
        subscriber.stop = types.MethodType(stop, subscriber)  # type: ignore[method-assign]


def feed(broker: ServiceBroker, subscriber: LogicSubscriber[Any], feeder: Feeder) -> None:
    """Have `feeder` (started and stopped with the broker) hand `subscriber` its messages."""
    broker._fed.append(_Fed(subscriber, feeder))


def pulled(spec: streams.ConsumerSpec, *, batch: int, linger: float, batched: bool) -> Feeder:
    """A feeder: the bus's standing pull of `spec`, `batch` messages at a time."""

    async def run(bus: Bus, subscriber: LogicSubscriber[Any], halt: asyncio.Event) -> None:
        if batched:
            async def hand_over(messages: list[Msg]) -> None:
                await subscriber.consume(messages)
        else:
            async def hand_over(messages: list[Msg]) -> None:
                for msg in messages:
                    await subscriber.consume(msg)
        await bus.pull_loop(spec, hand_over, stop=halt, batch=batch, linger=linger)

    return run


def service_broker(
    url: str, *, service: str, user: str | None = None, password: str | None = None, graceful_timeout: float = 15.0
) -> ServiceBroker:
    """The broker of `service`: reconnecting for ever (an outage costs latency, never the process).

    `url` may list a cluster's servers separated by commas. The NATS user is `user` or the one the URL
    names; a user of `permissions.ACCESS` gets replies on its own inbox prefix (its permissions allow no
    other). FastStream's per-message log lines go to DEBUG: a busy consumer would otherwise write one
    line per message.
    """
    named = user or nats_url_user(url)
    access = permissions.ACCESS.get(named) if named else None
    options: dict[str, Any] = {}
    if access is not None:
        options["inbox_prefix"] = access.inbox_prefix
    if user:
        options["security"] = NatsUserPassword(username=user, password=password or "")

    async def on_error(error: Exception) -> None:
        log.warning("nats error: %s", error, extra={"service": service})

    return ServiceBroker(
        server_urls(url),
        service=service,
        access=access,
        name=service,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        graceful_timeout=graceful_timeout,
        logger=logging.getLogger(f"visionyard.{service}.faststream"),
        log_level=logging.DEBUG,
        **options,
    )


# -- middlewares ---------------------------------------------------------------------------------


def _as_permanent(error: Exception) -> Exception:
    """An invalid payload never becomes valid: dead-letter it at once, naming what was wrong.

    An unknown major schema version is named as such (pydantic reports it as the model's validation error).
    """
    if isinstance(error, SchemaVersionError):
        return PermanentError(f"unsupported schema version: {error.reason}")
    if isinstance(error, ValidationError):
        version = next((item.get("ctx", {}).get("error") for item in error.errors()
                        if isinstance(item.get("ctx", {}).get("error"), SchemaVersionError)), None)
        if version is not None:
            return PermanentError(f"unsupported schema version: {version.reason}")
        return PermanentError(f"invalid payload: {error}")
    return error


def settling(broker: ServiceBroker, spec: streams.ConsumerSpec) -> type[BaseMiddleware]:
    """The middleware that settles each message of `spec`'s consumer by its handler's outcome."""
    latency = metrics.HANDLER_SECONDS.labels(spec.durable)

    class Settle(BaseMiddleware):
        async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
            raw = msg.raw_message
            batch: list[Msg] = raw if isinstance(raw, list) else [raw]
            started = time.perf_counter()
            error: Exception | None = None
            result = None
            with _consume_span(spec, batch):
                try:
                    result = await call_next(msg)
                except Exception as caught:
                    error = _as_permanent(caught)
            latency.observe(time.perf_counter() - started)
            for each in batch:
                if not each.is_acked:
                    sink = broker.dead_letters
                    await settle(each, spec, error, dead_letter=sink.dead_letter if sink is not None else None)
            return result

    return Settle


def _consume_span(spec: streams.ConsumerSpec, batch: list[Msg]) -> Any:
    if len(batch) == 1:
        return tracing.span(f"consume {spec.durable}", headers=batch[0].headers, kind=SpanKind.CONSUMER,
                            subject=batch[0].subject)
    return tracing.spans_per_trace(f"consume {spec.durable}", [m.headers for m in batch] if tracing.enabled() else [])


class AnswerErrors(BaseMiddleware):
    """A failing request handler answers the reason instead of leaving its caller to time out."""

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
        subject = msg.raw_message.subject
        try:
            with tracing.span(f"serve {subject}", headers=msg.headers, kind=SpanKind.SERVER, subject=subject):
                return await call_next(msg)
        except Exception as error:
            log.exception("request handler failed", extra={"subject": subject})
            return error_reply(error)


class LogHintErrors(BaseMiddleware):
    """A failing hint handler is logged; the hint is gone (its loss costs time, never data)."""

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: Any) -> Any:
        try:
            return await call_next(msg)
        except Exception:
            log.exception("hint handler failed", extra={"subject": msg.raw_message.subject})
            return None


# -- binders -------------------------------------------------------------------------------------


def responder(broker: NatsBroker, subject: str, *, queue: str, title: str | None = None,
              description: str | None = None) -> Any:
    """Declare a request-reply handler on `subject` (queue group `queue`, so replicas share load)."""
    router = NatsRouter(middlewares=[AnswerErrors])
    broker.include_router(router)
    return router.subscriber(subject, queue=queue, title=title, description=description)


def listener(broker: NatsBroker, subject: str, *, queue: str, title: str | None = None,
             description: str | None = None) -> Any:
    """Declare a hint handler on `subject` (queue group `queue`)."""
    router = NatsRouter(middlewares=[LogHintErrors])
    broker.include_router(router)
    return router.subscriber(subject, queue=queue, title=title, description=description)


def consumer(
    broker: ServiceBroker,
    spec: streams.ConsumerSpec,
    *,
    subjects: Sequence[str] | None = None,
    batch: int = 1,
    linger: float = 0.0,
    batched: bool = False,
    title: str | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., Any]], Any]:
    """Declare the handler of `spec`'s durable consumer; the bus's standing pull feeds it `batch` at a time.

    `batched`: the handler takes the whole batch (FastStream's batch subscriber) and may settle poison
    messages itself; if it raises, every unsettled message of the batch is nak'ed (all-or-nothing).
    """
    subscriber = consumer_subscriber(broker, spec, subjects=subjects, batch=batch, batched=batched, title=title,
                                     description=description)

    def bind(handler: Callable[..., Any]) -> Any:
        wrapped = subscriber(handler)
        feed(broker, subscriber, pulled(spec, batch=batch, linger=linger, batched=batched))
        return wrapped

    return bind


def consumer_subscriber(
    broker: ServiceBroker,
    spec: streams.ConsumerSpec,
    *,
    subjects: Sequence[str] | None = None,
    batch: int = 1,
    batched: bool = False,
    title: str | None = None,
    description: str | None = None,
) -> Any:
    """The settled subscriber of `spec`'s durable consumer, for a service that feeds it itself (`feed`)."""
    router = NatsRouter(middlewares=[settling(broker, spec)])
    broker.include_router(router)
    filters = list(subjects or spec.filter_subjects)
    return router.subscriber(
        filters[0] if len(filters) == 1 else "",
        config=None if len(filters) == 1 else ConsumerConfig(filter_subjects=filters),
        stream=JStream(spec.stream, declare=False),
        durable=spec.durable,
        pull_sub=PullSub(batch_size=batch, batch=batched),
        ack_policy=AckPolicy.MANUAL,
        title=title,
        description=description,
    )


def held_commands(broker: ServiceBroker, spec: streams.ConsumerSpec, *, description: str | None = None) -> Any:
    """The subscriber of a consumer whose commands its service claims itself (one per free slot) and holds
    while their jobs run: register its handlers with `subscriber(handler, filter=...)`, and `feed` it.

    Its settling middleware settles only what a handler left unsettled (an invalid payload: dead-lettered);
    a holding handler settles its command itself when the job ends.
    """
    router = NatsRouter(middlewares=[settling(broker, spec)])
    broker.include_router(router)
    return router.subscriber(
        "", config=ConsumerConfig(filter_subjects=list(spec.filter_subjects)),
        stream=JStream(spec.stream, declare=False), durable=spec.durable, pull_sub=PullSub(batch_size=1),
        ack_policy=AckPolicy.MANUAL, description=description,
    )
