"""Follow one training job over the API's WebSocket and render its progress as text.

The server stamps every job message with `seq`; after a dropped connection we reconnect with
`last_seq` (the newest seq we have seen) so the server replays only what we missed. Messages are
also de-duplicated here by (seq, type), because one event may produce several messages sharing a
seq and a re-subscription may replay a little we already printed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlencode

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

BAR_WIDTH = 24
CLOSE_POLICY_VIOLATION = 1008
# Metrics worth a place on the progress line, in this order; the rest are left to MLflow.
KEY_METRICS = ("loss", "accuracy", "train_loss", "train_accuracy", "mAP50", "mAP50-95", "learning_rate")


@dataclass
class WatchOutcome:
    """How the watched job ended: `completed`, `failed` or `cancelled`, and the terminal message."""

    status: str
    message: dict[str, Any] = field(default_factory=dict)
    reconnects: int = 0

    @property
    def succeeded(self) -> bool:
        """Whether the job completed."""
        return self.status == "completed"


def progress_line(message: dict[str, Any]) -> str:
    """`epoch 3/5 [#########...] 60%  loss=0.1234 accuracy=0.9500` for a training_progress message."""
    epoch = int(message.get("current_epoch") or 0)
    total = int(message.get("total_epochs") or 0)
    fraction = min(max(epoch / total, 0.0), 1.0) if total else 0.0
    filled = round(fraction * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    metrics = message.get("metrics") or {}
    shown = [f"{key}={_number(metrics[key])}" for key in KEY_METRICS if key in metrics]
    width = len(str(total)) if total else 1
    return f"epoch {epoch:>{width}}/{total} [{bar}] {fraction * 100:5.1f}%  " + " ".join(shown)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


class ProgressRenderer:
    """Turns job messages into printed lines; remembers which (seq, type) it has already shown."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._seen: set[tuple[int, str]] = set()
        self.last_seq: int | None = None

    def accept(self, message: dict[str, Any]) -> bool:
        """Record a message; False when it is a duplicate that must not be shown again."""
        seq = message.get("seq")
        if not isinstance(seq, int):
            return True
        key = (seq, str(message.get("type")))
        if key in self._seen:
            return False
        self._seen.add(key)
        self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        return True

    def render(self, message: dict[str, Any]) -> None:
        """Print what a user wants to see of one message."""
        kind = message.get("type")
        if kind == "training_progress":
            self._print(progress_line(message))
        elif kind == "training_log":
            level = message.get("level") or "info"
            self._print(f"  [{str(level).lower()}] {message.get('message', '')}")
        elif kind == "training_status_change":
            self._print(f"status: {message.get('old_status')} -> {message.get('new_status')}")
        elif kind == "training_complete":
            best = message.get("best_metrics") or {}
            suffix = f"; best {', '.join(f'{k}={_number(v)}' for k, v in best.items())}" if best else ""
            self._print(f"completed after {message.get('total_epochs_completed')} epochs{suffix}")
        elif kind == "training_error":
            self._print(f"training ended: {message.get('status')}: {message.get('error_message')}")

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def terminal_status(message: dict[str, Any]) -> str | None:
    """`completed`/`failed`/`cancelled` if the message ends the job, else None."""
    kind = message.get("type")
    if kind == "training_complete":
        return "completed"
    if kind == "training_error":
        status = str(message.get("status") or "")
        if status == "cancelled" or message.get("error_message") == "cancelled":
            return "cancelled"
        return "failed"
    return None


def connect_url(ws_url: str, job_id: str | int, last_seq: int | None) -> str:
    """The WebSocket URL for `job_id`: its whole history first (`last_seq=0`), or what came after `last_seq`.

    The server sends live messages only to a client that gives no `last_seq`; `watch` wants the history too
    (a job may have finished before it connected).
    """
    params: dict[str, Any] = {"job_id": job_id, "last_seq": 0 if last_seq is None else last_seq}
    return f"{ws_url}?{urlencode(params)}"


async def watch_job(
    ws_url: str,
    job_id: str | int,
    *,
    out: TextIO | None = None,
    reconnect_delay: float = 0.5,
    max_reconnect_delay: float = 5.0,
    give_up_after: int = 30,
    token: str | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> WatchOutcome:
    """Follow `job_id` until it completes, fails or is cancelled, reconnecting with `last_seq`."""
    renderer = ProgressRenderer(out or sys.stdout)
    reconnects = 0
    failures_in_a_row = 0
    headers = {"Authorization": f"Bearer {token}"} if token else None
    while True:
        url = connect_url(ws_url, job_id, renderer.last_seq)
        try:
            # proxy=None: the API is reached directly; a system proxy must not intercept loopback.
            async with websockets.connect(url, additional_headers=headers, open_timeout=10, max_size=None,
                                          proxy=None) as socket:
                failures_in_a_row = 0
                # The same position as the URL's: a subscribe without last_seq restarts the feed live only,
                # which would cut off the history the URL's subscription is replaying.
                subscribe: dict[str, Any] = {"type": "subscribe", "job_id": _wire_id(job_id),
                                             "last_seq": 0 if renderer.last_seq is None else renderer.last_seq}
                await socket.send(json.dumps(subscribe))
                async for raw in socket:
                    try:
                        message = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(message, dict):
                        continue
                    # Messages carry the integer id; the caller may hold it as a string (from argv).
                    if message.get("job_id") is not None and str(message["job_id"]) != str(job_id):
                        continue
                    if not renderer.accept(message):
                        continue
                    if on_message is not None:
                        on_message(message)
                    renderer.render(message)
                    status = terminal_status(message)
                    if status is not None:
                        return WatchOutcome(status=status, message=message, reconnects=reconnects)
            _refuse_if_rejected(socket.close_code, socket.close_reason)
        except ConnectionClosed as closed:
            _refuse_if_rejected(closed.rcvd.code if closed.rcvd else None, closed.rcvd.reason if closed.rcvd else "")
        except (OSError, InvalidHandshake, TimeoutError) as error:
            failures_in_a_row += 1
            if failures_in_a_row > give_up_after:
                raise ConnectionError(f"cannot reconnect to {ws_url}: {error}") from error
        # The connection ended before the job did: resume after the newest seq we have shown.
        reconnects += 1
        delay = min(reconnect_delay * (2 ** max(failures_in_a_row - 1, 0)), max_reconnect_delay)
        await asyncio.sleep(delay)


def _wire_id(job_id: str | int) -> str | int:
    """The job id as the API's messages carry it: an integer when it is one."""
    text = str(job_id)
    return int(text) if text.isdigit() else job_id


def _refuse_if_rejected(code: int | None, reason: str | None) -> None:
    """A policy-violation close (bad credentials) will not get better by reconnecting."""
    if code == CLOSE_POLICY_VIOLATION:
        raise PermissionError(f"the API refused the WebSocket: {reason or 'policy violation'}")
