"""What a training job asks for (cpu, or gpu and how many) and where such a command is queued.

A job asks in its config: `advanced_config.device` is `"cpu"` (the default) or `"gpu"`, and
`advanced_config.gpu_count` how many GPUs (default 1). The scheduler admits a CPU job's command to
`cmd.train.job.<id>.<attempt>` and a GPU job's to `cmd.train.gpu.<count>.<id>.<attempt>` (commands sent
straight to the runners use `cmd.train` and `cmd.train.gpu.<count>`); only runners with at least that many
GPUs pull GPU commands, and only while that many are free — so a GPU job waits in the stream, unclaimed,
until such a runner has them.
The runner gives each job's process its own `CUDA_VISIBLE_DEVICES` (empty for a CPU job) and hands
the trainer the device to use as `advanced_config.device` (`"cpu"`, or `"0"`, `"0,1"`: indices within
the visible devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from visionyard.shared import subjects

MAX_GPUS_PER_JOB = 8
DEVICE_KEY = "device"
GPU_COUNT_KEY = "gpu_count"


@dataclass(frozen=True)
class DeviceRequest:
    """What one job needs: cpu, or `gpus` GPUs."""

    kind: Literal["cpu", "gpu"] = "cpu"
    gpus: int = 0

    @property
    def subject(self) -> str:
        """The command subject this job is queued on."""
        return subjects.CMD_TRAIN if self.kind == "cpu" else subjects.train_gpu(self.gpus)


class InvalidDeviceRequest(ValueError):
    """The config asks for devices in a way that cannot be served; `field` names the config key."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def device_request(advanced_config: dict[str, Any] | None) -> DeviceRequest:
    """The device request of a job's `advanced_config`; InvalidDeviceRequest naming the key otherwise."""
    config = advanced_config or {}
    raw = config.get(DEVICE_KEY, "cpu")
    kind = str(raw).strip().lower() if raw is not None else "cpu"
    count = config.get(GPU_COUNT_KEY)
    if kind == "cpu":
        if count not in (None, 0):
            raise InvalidDeviceRequest(f"advanced_config.{GPU_COUNT_KEY}", "a cpu job takes no GPUs; set device to 'gpu'")
        return DeviceRequest()
    if kind not in ("gpu", "cuda"):
        raise InvalidDeviceRequest(f"advanced_config.{DEVICE_KEY}", f"{raw!r} is not 'cpu' or 'gpu'")
    if count is None:
        count = 1
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_GPUS_PER_JOB:
        raise InvalidDeviceRequest(f"advanced_config.{GPU_COUNT_KEY}",
                                   f"{count!r} is not a whole number from 1 to {MAX_GPUS_PER_JOB}")
    return DeviceRequest(kind="gpu", gpus=count)


def assigned_device(request: DeviceRequest) -> str:
    """The device string a trainer passes to its framework: `cpu`, or GPU indices within CUDA_VISIBLE_DEVICES."""
    return "cpu" if request.kind == "cpu" else ",".join(str(index) for index in range(request.gpus))
