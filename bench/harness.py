"""What every platform benchmark needs: the embedded stack with the synthetic trainer, a dataset, jobs.

The stack is the real one (`EmbeddedStack`: nats-server and every service as its own process); only
the runner command is swapped for `bench.synthetic_runner`, which registers the synthetic trainer
beside the installed ones. Also: the statistics every report uses (median, min, max, percentiles).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from visionyard.cli.client import ApiClient
from visionyard.cli.dataset_upload import upload_dataset
from visionyard.cli.stack import DEFAULT_COMMANDS, EmbeddedStack
from visionyard.shared.natsserver import free_port

REPO = Path(__file__).resolve().parents[1]
TERMINAL = frozenset({"completed", "failed", "cancelled"})


def synthetic_config(dataset_id: str, **advanced: Any) -> dict[str, Any]:
    """The `config` of a job that runs the synthetic trainer with `advanced` as its behaviour."""
    return {"framework": "synthetic", "model_name": "synthetic", "task_type": "image_classification",
            "dataset_id": dataset_id, "epochs": 1, "batch_size": 1, "learning_rate": 0.001,
            "advanced_config": advanced}


def tiny_imagefolder_zip(path: Path, *, per_class: int = 4) -> Path:
    """A few 8×8 PNGs in two classes: the smallest dataset storage accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for label in ("a", "b"):
            for index in range(per_class):
                image = Path(path.parent / f"{label}{index}.png")
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(image)
                archive.write(image, f"{label}/{index}.png")
                image.unlink()
    return path


@dataclass
class BenchStack:
    """The embedded stack with synthetic-capable runners, and a REST client on it."""

    data_dir: Path
    runners: int = 1
    slots: int = 2
    storage_backend: str = "local"
    storage_env: Mapping[str, str] = field(default_factory=dict)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    stack: EmbeddedStack = field(init=False)
    client: ApiClient = field(init=False)

    def __enter__(self) -> BenchStack:
        commands = dict(DEFAULT_COMMANDS)
        commands["runner"] = [sys.executable, "-m", "bench.synthetic_runner"]
        env = {"PYTHONPATH": str(REPO), "VISIONYARD_RUNNER_SLOTS": str(self.slots),
               "VISIONYARD_RUNNER_TRAINER_PYTHON": sys.executable, **self.extra_env}
        self.stack = EmbeddedStack(data_dir=self.data_dir, api_port=free_port(), runners=self.runners,
                                   storage_backend=self.storage_backend, storage_env=self.storage_env,
                                   service_commands=commands, extra_env=env, ready_timeout=120.0)
        self.stack.start()
        self.client = ApiClient(self.stack.api_url, timeout=60.0)
        self._wait_for_trainer("synthetic")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.stack.stop()

    def _wait_for_trainer(self, framework: str, timeout: float = 60.0) -> None:
        # Runners publish their capabilities once connected; a job created earlier would be refused.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            models = self.client.request("GET", "/api/v1/models/list", params={"framework": framework})
            if models and (models.get("models") if isinstance(models, dict) else models):
                return
            time.sleep(0.2)
        raise TimeoutError(f"no runner offered the {framework} trainer after {timeout:.0f}s")

    @property
    def nats_url(self) -> str:
        """The stack's nats-server."""
        assert self.stack.nats is not None
        return self.stack.admin_nats_url

    @property
    def api_db_path(self) -> Path:
        """The API's SQLite database (the embedded default)."""
        return self.stack.data_dir / "api.db"

    def upload(self, zip_path: Path, *, name: str = "bench") -> str:
        """Upload an ImageFolder zip and wait until it is ready; its dataset id."""
        outcome = upload_dataset(self.client, zip_path, name=name, poll_interval=0.1)
        if not outcome.ready:
            raise RuntimeError(f"dataset rejected: {outcome.reason}")
        return outcome.dataset_id

    def create_job(self, config: dict[str, Any]) -> str:
        """POST /training/jobs; the job id."""
        return str(self.client.create_job(config=config, experiment_name="bench")["id"])

    def start_job(self, job_id: str) -> None:
        """POST /training/jobs/{id}/start."""
        self.client.start_job(job_id)

    def wait_jobs(self, job_ids: Sequence[str], *, timeout: float = 600.0, every: float = 0.1,
                  done: Callable[[dict[str, Any]], bool] = lambda job: job["status"] in TERMINAL) -> dict[str, dict[str, Any]]:
        """Poll until every job satisfies `done`; the final rows by id."""
        pending = list(job_ids)
        finished: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending:
            still = []
            for job_id in pending:
                job = self.client.get_job(job_id)
                if done(job):
                    finished[job_id] = job
                else:
                    still.append(job_id)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} jobs not done after {timeout:.0f}s, e.g. {pending[0]}")
                time.sleep(every)
        return finished

    def pid_of(self, name: str) -> int:
        """Pid of the service labelled `name` (api, tracker, storage, runner, runner-2, ...)."""
        for service in self.stack.services:
            if service.name == name:
                return service.pid
        raise KeyError(name)


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """CPU seconds (user + system) a process has used, or its reaped children have (`children`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if children else 11  # cutime, cstime or utime, stime (proc(5), counted after the name)
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """`median (min–max)` of several runs, formatted."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def row(*cells: object) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def http_get(url: str) -> Any:
    """GET a JSON document."""
    return httpx.get(url, timeout=10).json()
