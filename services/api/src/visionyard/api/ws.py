"""WebSocket endpoint `/api/v1/ws/training` and `/api/v1/ws/stats` (API.md contract).

Thin adapter: authenticate, accept, then route client messages (ping, subscribe, unsubscribe) to a
`LiveConnection`, whose feeds read the EVENTS stream directly. `batch_ms` (query or subscribe message)
opts a subscription into batched frames (`livebatch`); without it every message is its own frame.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect

from visionyard.api.auth import resolve_principal
from visionyard.api.live import LiveConnection, LiveStats
from visionyard.api.livebatch import parse_batch_ms
from visionyard.api.livehub import FeedHub

router = APIRouter()

# Close code for a client too slow to keep up: it should reconnect with `last_seq`.
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008


def _stats(app: Any) -> LiveStats:
    if not hasattr(app.state, "live_stats"):
        app.state.live_stats = LiveStats()
    stats: LiveStats = app.state.live_stats
    return stats


def _hub(app: Any) -> FeedHub:
    # One shared feed per watched job in this API instance, whatever the number of clients.
    if getattr(app.state, "live_hub", None) is None:
        app.state.live_hub = FeedHub(bus=app.state.bus)
    hub: FeedHub = app.state.live_hub
    return hub


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _bearer(websocket: WebSocket, token: str | None) -> str | None:
    if token:
        return token
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:]
    return websocket.headers.get("x-api-key")


@router.websocket("/api/v1/ws/training")
async def training_socket(
    websocket: WebSocket,
    job_id: str | None = None,
    session_id: str | None = None,
    last_seq: int | None = None,
    token: str | None = None,
    batch_ms: str | None = None,
) -> None:
    """Live job events: `connected`, then the subscribed jobs' messages (or frames of them), each with its `seq`."""
    app = websocket.app
    try:
        resolve_principal(_bearer(websocket, token), app.state.settings)
    except PermissionError as refused:
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=str(refused)[:120])
        return
    await websocket.accept()
    session = session_id or uuid.uuid4().hex
    connection = LiveConnection(bus=app.state.bus, write=websocket.send_json, stats=_stats(app), hub=_hub(app),
                                write_text=websocket.send_text)
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
    if job_id and valid:
        await _subscribe(connection, job_id, last_seq=last_seq, batch_ms=default_batch_ms)
    receiver = asyncio.create_task(_receive(websocket, connection, default_batch_ms=default_batch_ms))
    overflow = asyncio.create_task(connection.overflowed.wait())
    try:
        done, _ = await asyncio.wait({receiver, overflow}, return_when=asyncio.FIRST_COMPLETED)
        if overflow in done:
            await websocket.close(code=CLOSE_TRY_AGAIN_LATER, reason="client too slow; reconnect with last_seq")
    finally:
        for task in (receiver, overflow):
            task.cancel()
        await connection.close()


async def _subscribe(connection: LiveConnection, job_id: str, *, last_seq: int | None, batch_ms: int | None) -> None:
    subscribed: dict[str, Any] = {"type": "subscribed", "job_id": job_id, "timestamp": _now()}
    if batch_ms is not None:
        subscribed["batch_ms"] = batch_ms  # after clamping: the client learns the interval it got
    await connection.enqueue(subscribed)
    await connection.subscribe(job_id, last_seq=last_seq, batch_ms=batch_ms)


async def _receive(websocket: WebSocket, connection: LiveConnection, *, default_batch_ms: int | None) -> None:
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
                target = message.get("job_id")
                if not isinstance(target, str) or not target:
                    await connection.enqueue({"type": "error", "message": "subscribe needs a job_id string"})
                    continue
                # Absent: the connection's default; null: one message per frame.
                chosen = message.get("batch_ms", default_batch_ms)
                try:
                    target_batch_ms = None if chosen is None else parse_batch_ms(chosen)
                except ValueError as error:
                    await connection.enqueue({"type": "error", "message": str(error)})
                    continue
                last = message.get("last_seq")
                await _subscribe(connection, target, last_seq=last if isinstance(last, int) else None,
                                 batch_ms=target_batch_ms)
            elif kind == "unsubscribe":
                target = str(message.get("job_id", ""))
                await connection.unsubscribe(target)
                await connection.enqueue({"type": "unsubscribed", "job_id": target, "timestamp": _now()})
            else:
                await connection.enqueue({"type": "error", "message": f"unknown message type {kind!r}"})
    except WebSocketDisconnect:
        return


@router.get("/api/v1/ws/stats")
async def websocket_stats(request: Request) -> dict[str, int]:
    """Connection, subscription and message counts of this API instance."""
    stats = _stats(request.app)
    return {
        "active_connections": stats.connections,
        "active_subscriptions": stats.subscriptions,
        "messages_sent": stats.messages_sent,
        "dropped_slow_clients": stats.dropped_slow_clients,
    }
