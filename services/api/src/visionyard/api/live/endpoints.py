"""WebSocket endpoint `/api/v1/ws/training` and `/api/v1/ws/stats` (API.md contract).

Thin adapter: authenticate, accept, then route client messages (ping, subscribe, unsubscribe) to a
`LiveConnection`, whose feeds read the EVENTS stream directly. `batch_ms` (query or subscribe message)
opts a subscription into batched frames (`live.batch`); without it every message is its own frame.

Where a subscription starts: `last_seq=N` → everything after N (`last_seq=0`: the whole history), then
live. Without `last_seq` → live messages only, unless the same `session_id` was connected to this API
instance within `SESSION_MEMORY_SECONDS`: then it resumes where that connection stopped. The original
frontend reopens its socket on every render and never sends `last_seq`; replaying the history to each
socket flooded it (461 sockets and refetches in 10 s).

A browser page that names neither (it sends an `Origin` header and `job_id`, no `last_seq`, no `session_id`)
is identified by (peer address, Origin, User-Agent, job): only its newest socket carries the job's
messages, starting where its previous socket stopped, and the older ones are muted (left open: the
original frontend leaks a socket per render, and closing them makes it reconnect more). Measured with that
frontend in headless Chromium before this: up to 255 of its sockets open at once, each live message
delivered to every one of them (3,530 deliveries of 16 messages), its log view filled with duplicates.
Its new socket starts from what the replaced one wrote (`live.page` says why).
The cost: two tabs of one browser on the same job share one feed (the newest tab gets it). Clients
without an Origin (the CLI, scripts, the bench) are never muted.

A terminal message (`training_complete`, `training_error`) waits until the job's row shows the
terminal status, so a client that refetches the job on it never reads a stale `running`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from visionyard.api.auth import (
    CurrentPrincipal,
    Principal,
    Role,
    resolve_socket_principal,
)
from visionyard.api.auth.objects import ObjectAccess
from visionyard.api.db.models import TrainingJob
from visionyard.api.db.session import reading
from visionyard.api.errors import NotFound, Unauthorized
from visionyard.api.jobstate import TERMINAL
from visionyard.api.live.batch import parse_batch_ms
from visionyard.api.live.feed import LiveConnection, LiveStats
from visionyard.api.live.hub import FeedHub
from visionyard.api.live.page import (
    SESSION_MEMORY_SECONDS,
    PageKey,
    PageSockets,
    PageWriter,
)
from visionyard.api.scheduling.feed import QueuePositionsFeed
from visionyard.shared import streams

router = APIRouter()

# Close code for a client too slow to keep up: it should reconnect with `last_seq`.
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008


def _stats(app: Any) -> LiveStats:
    if not hasattr(app.state, "live_stats"):
        app.state.live_stats = LiveStats()
    stats: LiveStats = app.state.live_stats
    return stats


# The longest a terminal message waits for the job's row (the projector) before it is sent anyway.
PROJECTION_WAIT_SECONDS = 30.0
PROJECTION_POLL_SECONDS = 0.05
TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)


def _hub(app: Any) -> FeedHub:
    # One shared feed per watched job in this API instance, whatever the number of clients.
    if getattr(app.state, "live_hub", None) is None:
        app.state.live_hub = FeedHub(bus=app.state.bus, gate=_projection_gate(app))
    hub: FeedHub = app.state.live_hub
    return hub


# How far along an attempt each status is: the row "shows" a status once it is there or further.
_PROGRESS = {"pending": 0, "queued": 1, "retrying": 1, "resuming": 1, "running": 2, "cancelling": 3}


def _shows(row_status: str, status: str) -> bool:
    if row_status in TERMINAL_STATUSES:
        return True
    return _PROGRESS.get(row_status, 0) >= _PROGRESS.get(status, 4)


def _positions(app: Any) -> QueuePositionsFeed | None:
    # One watch of the scheduler's position shards per API instance, started by the first subscriber.
    if getattr(app.state, "queue_positions", None) is None and getattr(app.state, "bus", None) is not None:
        app.state.queue_positions = QueuePositionsFeed(app.state.bus)
    feed: QueuePositionsFeed | None = getattr(app.state, "queue_positions", None)
    return feed


def _projection_gate(app: Any) -> Any:
    """Wait until the job's row shows a status (the projector may be a moment behind the stream)."""

    def state_of(job_id: str) -> tuple[str, int] | None:
        with reading(app.state.session_factory) as session:
            job = session.get(TrainingJob, job_id)
            return (job.status, job.attempt) if job is not None else None

    async def gate(job_id: str, attempt: int, status: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROJECTION_WAIT_SECONDS
        while loop.time() < deadline:
            state = await run_in_threadpool(state_of, job_id)
            # A later attempt began (restart, resume, retry): this change of an earlier one is history, and
            # the row will not show it again; waiting would hold the new attempt's messages back.
            if state is None or state[1] > attempt or (state[1] == attempt and _shows(state[0], status)):
                return
            await asyncio.sleep(PROJECTION_POLL_SECONDS)

    return gate


class SessionPositions:
    """Where each recent session stopped, per job: a socket reopened with the same `session_id` resumes there."""

    def __init__(self) -> None:
        self._positions: dict[str, tuple[float, dict[str, int]]] = {}

    def remember(self, session_id: str, positions: dict[str, int]) -> None:
        """Record where a closing connection stopped."""
        now = asyncio.get_running_loop().time()
        self._positions = {key: value for key, value in self._positions.items()
                           if now - value[0] < SESSION_MEMORY_SECONDS}
        if positions:
            known = self._positions.get(session_id, (now, {}))[1]
            self._positions[session_id] = (now, {**known, **positions})

    def recall(self, session_id: str | None, job_id: str) -> int | None:
        """Where that session stopped on that job, if it was here recently."""
        if not session_id or session_id not in self._positions:
            return None
        moment, positions = self._positions[session_id]
        if asyncio.get_running_loop().time() - moment >= SESSION_MEMORY_SECONDS:
            return None
        return positions.get(job_id)


def _pages(app: Any) -> PageSockets:
    if getattr(app.state, "live_pages", None) is None:
        app.state.live_pages = PageSockets()
    pages: PageSockets = app.state.live_pages
    return pages


def _page_key(websocket: WebSocket, job_id: str) -> PageKey | None:
    origin = websocket.headers.get("origin")
    if not origin:
        return None  # not a browser: never muted
    host = websocket.client.host if websocket.client else ""
    return host, origin, websocket.headers.get("user-agent", ""), job_id


def _sessions(app: Any) -> SessionPositions:
    if getattr(app.state, "live_sessions", None) is None:
        app.state.live_sessions = SessionPositions()
    sessions: SessionPositions = app.state.live_sessions
    return sessions


def _now() -> str:
    return datetime.now(UTC).isoformat()


@router.websocket("/api/v1/ws/training")
async def training_socket(
    websocket: WebSocket,
    job_id: int | None = None,
    session_id: str | None = None,
    last_seq: int | None = None,
    token: str | None = None,
    batch_ms: str | None = None,
) -> None:
    """Live job events: `connected`, then the subscribed jobs' messages (or frames of them), each with its `seq`."""
    app = websocket.app
    try:
        principal = await resolve_socket_principal(websocket, token)
    except Unauthorized as refused:
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=str(refused)[:120])
        return
    await websocket.accept()
    session = session_id or uuid.uuid4().hex
    connection = LiveConnection(bus=app.state.bus, write=websocket.send_json, stats=_stats(app), hub=_hub(app),
                                write_text=websocket.send_text, gate=_projection_gate(app), positions=_positions(app))
    page = _page_key(websocket, str(job_id)) if job_id is not None and last_seq is None and not session_id else None
    if page is not None:
        # One of the page's sockets carries the job; this one writes only while it does (`live.page`).
        connection.page = PageWriter()
    # Everything after accept goes through the connection's single writer, so messages never interleave.
    connected = {"type": "connected", "session_id": session, "timestamp": _now()}
    if page is None:
        await connection.enqueue(connected)
    # The query's batch_ms is the connection's default for every subscription; a bad one subscribes nothing.
    default_batch_ms: int | None = None
    valid = True
    if batch_ms is not None:
        try:
            default_batch_ms = parse_batch_ms(batch_ms)
        except ValueError as error:
            valid = False
            await connection.enqueue({"type": "error", "message": str(error)})
    if page is not None and valid:
        await _join_page(websocket, connection, principal, str(job_id), page=page, greeting=connected,
                         batch_ms=default_batch_ms)
    elif job_id is not None and valid:
        await _subscribe(websocket, connection, principal, str(job_id), last_seq=last_seq, batch_ms=default_batch_ms,
                         session_id=session_id)
    receiver = asyncio.create_task(_receive(websocket, connection, principal, default_batch_ms=default_batch_ms,
                                            session_id=session_id))
    overflow = asyncio.create_task(connection.overflowed.wait())
    try:
        done, _ = await asyncio.wait({receiver, overflow}, return_when=asyncio.FIRST_COMPLETED)
        if overflow in done:
            await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason="client too slow; reconnect with last_seq")
    finally:
        for task in (receiver, overflow):
            task.cancel()
        _sessions(app).remember(session, connection.positions())
        if page is not None and connection.page is not None:
            await _pages(app).leave(page, connection.page)
        await connection.close()


async def _may_watch(websocket: WebSocket, connection: LiveConnection, principal: Principal, job_id: str) -> bool:
    access: ObjectAccess = websocket.app.state.access
    try:
        await run_in_threadpool(access.require, principal, "training", job_id, Role.VIEWER, field="job_id")
    except NotFound as missing:
        await connection.enqueue({"type": "error", "message": str(missing)})
        return False
    return True


async def _live_end(websocket: WebSocket) -> int:
    """The stream's last seq: everything up to it is history a client that asked for live messages did not want."""
    info = await websocket.app.state.bus.js.stream_info(streams.EVENTS.name)
    return int(info.state.last_seq)


async def _join_page(
    websocket: WebSocket, connection: LiveConnection, principal: Principal, job_id: str, *, page: PageKey,
    greeting: dict[str, Any], batch_ms: int | None,
) -> None:
    """A browser page's socket: it carries the job when `PageSockets` says so, from where the previous carrier stopped."""
    writer = connection.page
    if writer is None:
        return
    if not await _may_watch(websocket, connection, principal, job_id):
        await connection.enqueue(greeting)  # the page's only socket on a job it may not see: say why
        writer.carrying = True
        return
    greeted = False

    async def carry(start: tuple[int, int] | None) -> None:
        nonlocal greeted
        last_seq, skip = (await _live_end(websocket), 0) if start is None else (start[0] - 1, start[1])
        writer.delivered = (last_seq + 1, skip)
        if not greeted:  # the first time this socket carries the job
            greeted = True
            await connection.enqueue(greeting)
            await connection.enqueue({"type": "subscribed", "job_id": int(job_id), "last_seq": last_seq,
                                      "timestamp": _now()})
        await connection.subscribe(job_id, last_seq=last_seq, batch_ms=batch_ms, skip=skip)

    writer.carry = carry
    writer.mute = lambda: connection.unsubscribe(job_id)
    await _pages(websocket.app).join(page, writer, live_from=await _live_end(websocket))


async def _subscribe(
    websocket: WebSocket, connection: LiveConnection, principal: Principal, job_id: str, *, last_seq: int | None,
    batch_ms: int | None, session_id: str | None,
) -> None:
    if not await _may_watch(websocket, connection, principal, job_id):
        return
    if last_seq is None:
        last_seq = _sessions(websocket.app).recall(session_id, job_id)
    if last_seq is None:
        last_seq = await _live_end(websocket)
    subscribed: dict[str, Any] = {"type": "subscribed", "job_id": int(job_id), "last_seq": last_seq,
                                  "timestamp": _now()}
    if batch_ms is not None:
        subscribed["batch_ms"] = batch_ms  # after clamping: the client learns the interval it got
    await connection.enqueue(subscribed)
    await connection.subscribe(job_id, last_seq=last_seq, batch_ms=batch_ms)


def _job_id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    return None


async def _receive(
    websocket: WebSocket, connection: LiveConnection, principal: Principal, *, default_batch_ms: int | None,
    session_id: str | None,
) -> None:
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise ValueError("a message must be a JSON object")
                kind = message.get("type")
            except ValueError as error:
                await connection.enqueue({"type": "error", "message": f"invalid JSON message: {error}"})
                continue
            if kind == "ping":
                await connection.enqueue({"type": "pong", "timestamp": _now()})
            elif kind == "subscribe":
                target = _job_id(message.get("job_id"))
                if target is None:
                    await connection.enqueue({"type": "error", "message": "subscribe needs job_id: a job's integer id"})
                    continue
                # Absent: the connection's default; null: one message per frame.
                chosen = message.get("batch_ms", default_batch_ms)
                try:
                    target_batch_ms = None if chosen is None else parse_batch_ms(chosen)
                except ValueError as error:
                    await connection.enqueue({"type": "error", "message": str(error)})
                    continue
                last = message.get("last_seq")
                await _subscribe(websocket, connection, principal, target,
                                 last_seq=last if isinstance(last, int) and not isinstance(last, bool) else None,
                                 batch_ms=target_batch_ms, session_id=session_id)
            elif kind == "unsubscribe":
                target = _job_id(message.get("job_id")) or str(message.get("job_id", ""))
                await connection.unsubscribe(target)
                await connection.enqueue({"type": "unsubscribed", "job_id": int(target) if target.isdigit() else target,
                                          "timestamp": _now()})
            else:
                await connection.enqueue({"type": "error", "message": f"unknown message type {kind!r}"})
    except WebSocketDisconnect:
        return


@router.get("/api/v1/ws/stats")
async def websocket_stats(request: Request, principal: CurrentPrincipal) -> dict[str, int]:
    """Connection, subscription and message counts of this API instance."""
    stats = _stats(request.app)
    return {
        "active_connections": stats.connections,
        "active_subscriptions": stats.subscriptions,
        "messages_sent": stats.messages_sent,
        "dropped_slow_clients": stats.dropped_slow_clients,
    }
