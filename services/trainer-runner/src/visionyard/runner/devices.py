"""The runner's devices: which GPUs it has, which are free, and how it advertises them.

GPUs come from `VISIONYARD_RUNNER_GPUS` (`auto`: what `nvidia-smi` lists; `none`; or indices such as
`0,1`), or from `VISIONYARD_RUNNER_FAKE_GPUS=N` (N pretend GPUs, for tests on machines without one:
the runner schedules them exactly like real ones, and the trainer just sees their indices). A job holds
the GPUs it was given until its attempt ends; the runner advertises its slots, GPUs and free GPUs in
the `runner_devices` KV bucket under its runner id, on every change and every `advertise_seconds`: the
scheduler (docs/scheduling.md) counts the capacity of the runners that keep renewing it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from visionyard.shared import streams
from visionyard.shared.bus import Bus
from visionyard.shared.manifest import kv_safe_name

log = logging.getLogger("visionyard.runner.devices")


def detect_gpus(setting: str) -> list[str]:
    """GPU indices for a `gpus` setting: `none`, explicit `0,1`, or `auto` (nvidia-smi, if there is one)."""
    value = setting.strip().lower()
    if value in ("", "none", "0gpu"):
        return []
    if value != "auto":
        return [part.strip() for part in setting.split(",") if part.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("nvidia-smi failed, advertising no GPU: %s", error)
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


@dataclass
class GpuPool:
    """The runner's GPUs; `take` hands out free ones, `give_back` returns them."""

    gpus: list[str]
    fake: bool = False
    _free: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(self.gpus)

    @property
    def total(self) -> int:
        """How many GPUs this runner has."""
        return len(self.gpus)

    @property
    def free(self) -> int:
        """How many are not held by a job."""
        return len(self._free)

    def take(self, count: int) -> list[str] | None:
        """`count` free GPUs, or None (nothing taken) when fewer are free."""
        if count < 1 or count > len(self._free):
            return None
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def give_back(self, gpus: Iterable[str]) -> None:
        """Return GPUs a finished job held (in the pool's own order)."""
        returned = set(gpus) | set(self._free)
        self._free = [gpu for gpu in self.gpus if gpu in returned]

    def describe(self, *, runner_id: str, slots: int, export_inference_held: int = 0,
                 every: float = 0.0) -> dict[str, object]:
        """The advertisement: slots, every GPU, the free ones, the slots export/inference jobs hold, and how
        often it is renewed (the scheduler takes a runner that stops renewing for gone).

        The API's scheduler reads the export/inference count by the key `export_inference_held`.
        """
        return {"runner_id": runner_id, "slots": slots, "cpu": True, "gpus": list(self.gpus),
                "free_gpus": list(self._free), "fake_gpus": self.fake, "export_inference_held": export_inference_held,
                "advertise_seconds": every, "updated_at": time.time()}


async def advertise(bus: Bus, pool: GpuPool, *, runner_id: str, slots: int, export_inference_held: int = 0,
                    every: float = 0.0) -> None:
    """Put this runner's devices into `runner_devices` (best effort: the scheduler reads it, no job waits on it)."""
    try:
        kv = await bus.kv(streams.KV_RUNNER_DEVICES)
        description = pool.describe(runner_id=runner_id, slots=slots, export_inference_held=export_inference_held,
                                     every=every)
        await kv.put(kv_safe_name(runner_id), json.dumps(description).encode())
    except Exception as error:
        log.warning("could not advertise devices: %s", error)


async def withdraw(bus: Bus, *, runner_id: str) -> None:
    """Remove this runner's advertisement at shutdown."""
    try:
        kv = await bus.kv(streams.KV_RUNNER_DEVICES)
        await kv.delete(kv_safe_name(runner_id))
    except Exception as error:
        log.warning("could not withdraw devices: %s", error)
