"""Runner settings (env prefix `VISIONYARD_RUNNER_`)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from visionyard.shared import streams
from visionyard.shared.config import MetricsSettings, ServiceSettings

# The only variables a trainer inherits; credentials and the broker URL never reach it. The weights
# directory is where trainers read pretrained weights (nothing is downloaded at run time).
TRAINER_ENV_KEYS = ("PATH", "HOME", "LANG", "PYTHONPATH", "VISIONYARD_RUNNER_WEIGHTS_DIR")


def _default_runner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _trainer_base_env() -> dict[str, str]:
    return {key: os.environ[key] for key in TRAINER_ENV_KEYS if key in os.environ}


class RunnerSettings(ServiceSettings, MetricsSettings):
    """How many jobs to hold, where to work, how to run trainers."""

    model_config = SettingsConfigDict(env_prefix="VISIONYARD_RUNNER_", extra="ignore")

    slots: int = Field(default=2, ge=1)
    runner_id: str = Field(default_factory=_default_runner_id)
    work_dir: Path | None = None
    trainer_python: str = Field(default_factory=lambda: sys.executable)
    # Named trainer environments: `ultralytics=/path/to/venv,timm=/path/to/python` (or a JSON object);
    # a manifest's `environment` picks one. A venv directory means its bin/python.
    trainer_envs: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # GPUs this runner schedules: `auto` (nvidia-smi), `none`, or indices `0,1` (runner/devices.py).
    gpus: str = "auto"
    # Pretend GPUs (tests, demos on machines without one): scheduled like real ones; overrides `gpus`.
    fake_gpus: int = Field(default=0, ge=0, le=64)
    # Original-platform trainer directories (`train.py` + `capabilities.json`), separated by `:` or `,`.
    trainer_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    cancel_grace_seconds: float = Field(default=10.0, ge=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # How often the runner renews its `runner_devices` advertisement; the scheduler counts a runner's slots
    # only while it keeps renewing it (a killed runner's slots stop counting after a few periods).
    advertise_seconds: float = Field(default=5.0, gt=0)
    trainer_base_env: dict[str, str] = Field(default_factory=_trainer_base_env)
    # How long JetStream waits for a silent runner before handing its job to another (failover time);
    # unset keeps the consumer's (30 s by default, or VISIONYARD_TOPOLOGY_ACK_WAITS' "runner").
    ack_wait: float | None = Field(default=None, gt=0)
    # A trainer that says nothing (no SDK record, no output line) for this long is stopped as stalled;
    # a job may set its own `advanced_config.stall_seconds`. 0 disables the check.
    stall_seconds: float = Field(default=1800.0, ge=0)
    # A job's checkpoints of one kind are staged at most once per this many seconds (the newest one,
    # and always the last one at exit); a job may set `advanced_config.checkpoint_interval_seconds`.
    # 0 stages every checkpoint a trainer declares. See runner/cadence.py.
    checkpoint_interval_seconds: float = Field(default=10.0, ge=0)

    @field_validator("trainer_envs", mode="before")
    @classmethod
    def _parse_envs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"trainer_envs: {item!r} is not name=path")
            pairs[name.strip()] = path.strip()
        return pairs

    @field_validator("trainer_dirs", mode="before")
    @classmethod
    def _parse_dirs(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return [part.strip() for part in value.replace(",", os.pathsep).split(os.pathsep) if part.strip()]

    @model_validator(mode="after")
    def _derive(self) -> RunnerSettings:
        if self.work_dir is None:
            self.work_dir = self.data_dir / "runner"
        # A heartbeat slower than the ack wait would let JetStream hand a live job to another runner.
        ack_wait = self.ack_wait or streams.RUNNER.ack_wait
        if self.heartbeat_seconds >= ack_wait:
            raise ValueError(f"heartbeat_seconds must be < the runner ack wait ({ack_wait}s)")
        return self

    @property
    def runner_work_dir(self) -> Path:
        """The resolved working directory (datasets cache, job directories)."""
        assert self.work_dir is not None
        return self.work_dir.resolve()
