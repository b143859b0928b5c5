"""WebSocket endpoint `/api/v1/ws/training` and `/api/v1/ws/stats` (API.md contract).

Thin adapter: authenticate, accept, then route client messages (ping, subscribe, unsubscribe) to a
`LiveConnection`, whose feeds read the EVENTS stream directly. `batch_ms` (query or subscribe message)
opts a subscription into batched frames (`livebatch`); without it every message is its own frame.

Where a subscription starts: `last_seq=N` → everything after N (`last_seq=0`: the whole history), then
live. Without `last_seq` → live messages only, unless the same `session_id` was connected to this API
instance within `SESSION_MEMORY_SECONDS`: then it resumes where that connection stopped. The original
frontend reopens its socket on every render and never sends `last_seq`; replaying the history to each
socket flooded it (461 sockets and refetches in 10 s).

A browser page that names neither (it sends an `Origin` header, no `last_seq`, no `session_id`) is
identified by (peer address, Origin, User-Agent, job): only its newest socket carries the job's
messages, starting where its previous socket stopped, and the older ones are muted (left open: the
original frontend leaks a socket per render, and closing them makes it reconnect more). Measured with that
frontend in headless Chromium before this: up to 255 of its sockets open at once, each live message
delivered to every one of them (3,530 deliveries of 16 messages), its log view filled with duplicates.
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
from visionyard.api.errors import NotFound, Unauthorized
from visionyard.api.jobstate import TERMINAL
from visionyard.api.live import LiveConnection, LiveStats
from visionyard.api.livebatch import parse_batch_ms
from visionyard.api.livehub import FeedHub
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


# A reconnecting session resumes where it stopped if it comes back within this long.
SESSION_MEMORY_SECONDS = 120.0
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


def _positions(app: Any) -> QueuePositionsFeed | None:
    # One watch of the scheduler's position shards per API instance, started by the first subscriber.
    if getattr(app.state, "queue_positions", None) is None and getattr(app.state, "bus", None) is not None:
        app.state.queue_positions = QueuePositionsFeed(app.state.bus)
    feed: QueuePositionsFeed | None = getattr(app.state, "queue_positions", None)
    return feed


def _projection_gate(app: Any) -> Any:
    """Wait until the job's row shows a terminal status (the projector may be a moment behind the stream)."""

    def state_of(job_id: str) -> tuple[str, int] | None:
        with app.state.session_factory() as session:
            job = session.get(TrainingJob, job_id)
            return (job.status, job.attempt) if job is not None else None

    async def gate(job_id: str, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROJECTION_WAIT_SECONDS
        while loop.time() < deadline:
            state = await run_in_threadpool(state_of, job_id)
            # A later attempt began (restart, resume, retry): this end of an earlier one is history, and
            # the row will not show it again; waiting would hold the new attempt's messages back.
            if state is None or state[0] in TERMINAL_STATUSES or state[1] > attempt:
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


PageKey = tuple[str, str, str, str]


class PageSockets:
    """The newest socket of each browser page (peer, Origin, User-Agent) on each job; the older ones are muted."""

    def __init__(self) -> None:
        self._current: dict[PageKey, LiveConnection] = {}
        self._left_at: dict[PageKey, tuple[float, int]] = {}

    async def take_over(self, key: PageKey, connection: LiveConnection) -> int | None:
        """Mute the page's previous socket on the job; where the new one starts (None: a page not seen lately)."""
        now = asyncio.get_running_loop().time()
        job_id = key[-1]
        start: int | None = None
        previous = self._current.get(key)
        if previous is not None and previous is not connection:
            start = previous.positions().get(job_id)
            await previous.unsubscribe(job_id)
        left = self._left_at.pop(key, None)
        if start is None and left is not None and now - left[0] < SESSION_MEMORY_SECONDS:
            start = left[1]
        self._current[key] = connection
        return start

    def release(self, connection: LiveConnection) -> None:
        """A socket is closing: where it stopped is where the page's next socket starts."""
        now = asyncio.get_running_loop().time()
        self._left_at = {key: value for key, value in self._left_at.items() if now - value[0] < SESSION_MEMORY_SECONDS}
        positions = connection.positions()
        for key, current in list(self._current.items()):
            if current is connection:
                del self._current[key]
                if key[-1] in positions:
                    self._left_at[key] = (now, positions[key[-1]])


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
    # Everything after accept goes through the connection's single writer, so messages never interleave.
    await connection.enqueue({"type": "connected", "session_id": session, "timestamp": _now()})
    # The query's batch_ms is the connection's default for every subscription; a bad one subscribes nothing.
    default_batch_ms: int | None = None
    valid = True
    if batch_ms is not None:
        try:
            default_batch_ms = parse_batch_ms(batch_ms)
        except ValueError as error:
            valid = False
            await connection.enqueue({"type": "error", "message": str(error)})
    if job_id is not None and valid:
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
        _pages(app).release(connection)
        await connection.close()


async def _subscribe(
    websocket: WebSocket, connection: LiveConnection, principal: Principal, job_id: str, *, last_seq: int | None,
    batch_ms: int | None, session_id: str | None,
) -> None:
    access: ObjectAccess = websocket.app.state.access
    try:
        await run_in_threadpool(access.require, principal, "training", job_id, Role.VIEWER, field="job_id")
    except NotFound as missing:
        await connection.enqueue({"type": "error", "message": str(missing)})
        return
    if last_seq is None:
        last_seq = _sessions(websocket.app).recall(session_id, job_id)
    page = _page_key(websocket, job_id) if last_seq is None and not session_id else None
    if page is not None:
        last_seq = await _pages(websocket.app).take_over(page, connection)
    if last_seq is None:
        # Live only: everything up to the stream's current end is history this client did not ask for.
        info = await websocket.app.state.bus.js.stream_info(streams.EVENTS.name)
        last_seq = int(info.state.last_seq)
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
