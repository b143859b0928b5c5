"""WebSocket clients as a user's browser would be: subscribe to a job, timestamp every message received.

In batched mode (`batch_ms`) each frame is a JSON array of messages, parsed with one `orjson.loads`; every
message in it is timestamped with the frame's arrival.

The clients run in the bench process, on the two cores the stack being measured runs on, so they are kept
as cheap as a client can be: an asyncio protocol that parses the (unmasked, uncompressed) server frames in
`data_received` and handles each message right there, no task wake-up or queue per frame (the `websockets`
client hands each frame through a queue to a task per `recv`). At 100 clients × 1,000 events/s batched, the
bench process's CPU per 3-s stream went from 1.26–1.52 s to 0.97–1.03 s and the p99 from 77–166 ms to
35–55 ms (4 alternating pairs, bench/PROFILE.md, round 4). Parsing is orjson's (the stdlib's `json.loads` was 71 % of the
bench process at 100 clients × 1,000 events/s, round 3).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CONTINUATION, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@dataclass
class Received:
    """What one client saw of its job: progress messages, arrival times and emit→receive latencies."""

    progress: int = 0
    first: float = 0.0
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)
    terminal: bool = False


class _Client(asyncio.Protocol):
    """A minimal RFC 6455 client: one HTTP upgrade, then frames handed to `on_message` as they complete."""

    def __init__(self, request: bytes, key: bytes, on_message: Callable[[bytes, float], None]) -> None:
        self._request = request
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self._on_message = on_message
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._upgraded = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            del self._buffer[: end + 4]
            if not head.startswith(b"http/1.1 101") or b"sec-websocket-accept: " + self._accept.lower() not in head:
                self._fail(ConnectionError(f"WebSocket upgrade refused: {head.splitlines()[0]!r}"))
                return
            self._upgraded = True
            self.opened.set_result(None)
        self._frames(now)

    def _frames(self, now: float) -> None:
        buffer = self._buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, start = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if second & 0x80:
                self._fail(ConnectionError("the server masked a frame"))
                return
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            opcode, final = first & 0x0F, bool(first & 0x80)
            if opcode in (_TEXT, _BINARY, _CONTINUATION):
                if not final:
                    self._fragments.append(payload)
                    continue
                if self._fragments:
                    payload = b"".join([*self._fragments, payload])
                    self._fragments.clear()
                self._on_message(payload, now)
            elif opcode == _PING:
                self.send(_PONG, payload)
            elif opcode == _CLOSE:
                self.close()
                return

    def send(self, opcode: int, payload: bytes = b"") -> None:
        """One masked frame (clients must mask), for control frames: short payloads only."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        self.send(_CLOSE, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionError("connection closed")
        if not self.opened.done():
            self.opened.set_exception(error)
        if not self.closed.done():
            self.closed.set_exception(error) if exc else self.closed.set_result(None)

    def _fail(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        if not self.closed.done():
            self.closed.set_exception(error)
        if self.transport is not None:
            self.transport.close()


async def watch_job(api_url: str, job_id: str, *, expected: int, received: Received, ready: asyncio.Event | None = None,
                    measure_latency: bool = False, timeout: float = 600.0, batch_ms: int | None = None) -> Received:
    """Subscribe to `job_id` and count `training_progress` messages until `expected` arrived."""
    url = urlsplit(api_url)
    # last_seq=0: from the job's first event. Without it the API sends live messages only, counted from
    # when it subscribes, which is after the handshake this client takes as "ready".
    path = f"/api/v1/ws/training?job_id={job_id}&last_seq=0" + (f"&batch_ms={batch_ms}" if batch_ms is not None else "")
    key = base64.b64encode(os.urandom(16))
    request = (f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_message(raw: bytes, now: float) -> None:
        if done.done():
            return
        try:
            if batch_ms is not None:
                _take_frame(orjson.loads(raw), now=now, received=received)
            elif b'"training_progress"' in raw:  # only progress messages are parsed
                received.progress += 1
                if received.first == 0.0:
                    received.first = now
                received.last = now
                if measure_latency:
                    received.latencies.append(now - orjson.loads(raw)["metrics"]["t_emit"])
        except Exception as error:
            done.set_exception(error)
            return
        if received.progress >= expected:
            done.set_result(None)

    _, client = await loop.create_connection(lambda: _Client(request, key, on_message), url.hostname, url.port)
    try:
        async with asyncio.timeout(timeout):
            await client.opened
            if ready is not None:
                ready.set()
            await asyncio.wait([done, client.closed], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            client.closed.result()  # raises what closed it
            raise ConnectionError(f"closed after {received.progress} of {expected} progress messages")
        done.result()
    finally:
        client.close()
    return received


def _take_frame(frame: list[dict] | dict, *, now: float, received: Received) -> None:
    if isinstance(frame, dict):
        return  # connected, subscribed: not part of the job's stream
    for message in frame:
        if message["type"] != "training_progress":
            continue
        # The synthetic trainer counts epochs 1, 2, ...: a batch that lost, repeated or reordered one shows here.
        if message["current_epoch"] != received.progress + 1:
            raise RuntimeError(f"epoch {message['current_epoch']} after {received.progress}")
        received.progress += 1
        if received.first == 0.0:
            received.first = now
        received.last = now
        received.latencies.append(now - message["metrics"]["t_emit"])
