"""The runner's KV use: publishing trainer capabilities, reading and watching cancellations."""

from __future__ import annotations

import asyncio
import json
import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError

from visionyard.runner.ports import CancelRequests
from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.manifest import TrainerManifest, kv_safe_name

log = logging.getLogger("visionyard.runner.kv")

# How long a job's start waits out a JetStream that refuses reads (503 while a clustered bucket elects its
# leader, seen at a cluster's start) before the attempt fails: each failed start spends a delivery, and every
# delivery is a new attempt of the job.
READ_RETRY_SECONDS = 10.0
UNAVAILABLE = (ServiceUnavailableError, NoRespondersError, NatsTimeoutError)


async def read_entry(bus: Bus, bucket: str, key: str, *, within: float = READ_RETRY_SECONDS) -> bytes | None:
    """The value of `key` in `bucket` (None if there is none), retrying while JetStream is unavailable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.1
    while True:
        try:
            kv = await bus.kv(bucket)
            return (await kv.get(key)).value
        except KeyNotFoundError:
            return None
        except UNAVAILABLE as error:
            if loop.time() + delay > deadline:
                raise
            log.info("%s unavailable (%s); reading %s again in %.1fs", bucket, type(error).__name__, key, delay)
            await asyncio.sleep(delay)  # a back-off between tries, not a wait for readiness
            delay = min(delay * 2, 1.0)


def parse_cancel_attempt(value: bytes | None) -> int | None:
    """The attempt of a cancellation entry (`{"attempt": N}`); None if unreadable."""
    if not value:
        return None
    try:
        return int(json.loads(value)["attempt"])
    except (ValueError, KeyError, TypeError):
        return None


async def publish_capabilities(bus: Bus, manifests: list[TrainerManifest]) -> None:
    """Put every installed trainer's manifest into `trainer_capabilities` under its name."""
    kv = await bus.kv(streams.KV_CAPABILITIES)
    for manifest in manifests:
        await kv.put(kv_safe_name(manifest.name), manifest.model_dump_json().encode())


class KvCancellationLedger:
    """Reads `job_cancellations`."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def cancelled_attempt(self, job_id: str) -> int | None:
        """The attempt recorded for `job_id`, or None."""
        return parse_cancel_attempt(await read_entry(self._bus, streams.KV_CANCELLATIONS, job_id))


class KvTerminalLedger:
    """Reads `job_terminal`: the attempt at which the API saw a job finish."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def terminal_attempt(self, job_id: str) -> int | None:
        """The attempt recorded for `job_id`, or None while the job is not finished."""
        return parse_cancel_attempt(await read_entry(self._bus, streams.KV_JOB_TERMINAL, job_id))


async def watch_cancellations(bus: Bus, held: CancelRequests, *, stop: asyncio.Event) -> None:
    """Forward every cancellation entry to the held job it names, until `stop`; re-watch after errors."""
    while not stop.is_set():
        watcher = None
        try:
            kv = await bus.kv(streams.KV_CANCELLATIONS)
            watcher = await kv.watchall()
            while not stop.is_set():
                try:
                    entry = await watcher.updates(timeout=1.0)
                except NatsTimeoutError:
                    continue
                if entry is None or entry.operation is not None:
                    continue  # the end-of-initial-values marker, or a delete/purge
                attempt = parse_cancel_attempt(entry.value)
                if attempt is not None and held.request_cancel(entry.key, attempt):
                    log.info("cancel requested", extra={"job_id": entry.key, "attempt": attempt})
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("cancellation watch failed, re-watching: %s", error)
            await asyncio.sleep(1.0)
        finally:
            if watcher is not None:
                try:
                    await watcher.stop()
                except Exception:
                    pass
