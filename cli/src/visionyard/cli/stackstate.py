"""The state file `visionyard up` keeps in its data directory, and what `visionyard status` makes of it.

`<data-dir>/stack.json` names the `up` process and every process it supervises (state, pid, restarts,
last exit). It is rewritten atomically on every change and removed by a clean stop. A file whose `up`
is gone (killed with `kill -9`: its processes died with it) is stale; pids are matched with their
start time so a recycled pid is never taken for a live stack.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "stack.json"


def state_path(data_dir: Path) -> Path:
    """Where `up` keeps its state for `data_dir`."""
    return Path(data_dir) / STATE_FILE


def process_start_ticks(pid: int) -> int | None:
    """The start time of a live, non-zombie `pid` in clock ticks since boot (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 0, starttime field 19.
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_alive(pid: int | None, start_ticks: int | None) -> bool:
    """Whether `pid` is still the process that started at `start_ticks`."""
    if not pid:
        return False
    ticks = process_start_ticks(pid)
    if ticks is not None:
        return start_ticks is None or ticks == start_ticks
    if Path("/proc/self/stat").exists():
        return False  # Linux, and the pid is gone or a zombie
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ProcessState:
    """One supervised process as the state file records it."""

    name: str
    state: str
    pid: int | None
    start_ticks: int | None
    restarts: int
    log: str
    last_exit_code: int | None = None
    last_exit_at: float | None = None  # wall-clock seconds

    @property
    def alive(self) -> bool:
        """Whether the recorded pid is still that process."""
        return self.state != "stopped" and is_alive(self.pid, self.start_ticks)


@dataclass
class StackState:
    """The whole file: the `up` process, where things are, and its processes in start order."""

    pid: int
    start_ticks: int | None
    started_at: float
    data_dir: str
    api_url: str
    nats_url: str
    tracking_uri: str
    logs_dir: str
    processes: list[ProcessState] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        """Whether the `up` that wrote the file still runs."""
        return is_alive(self.pid, self.start_ticks)

    def process(self, name: str) -> ProcessState:
        """The process named `name` (`nats-server`, `api`, `runner-2`, ...)."""
        for process in self.processes:
            if process.name == name:
                return process
        raise KeyError(f"no process {name!r}; recorded: {[p.name for p in self.processes]}")

    def to_json(self) -> dict[str, Any]:
        """The file's JSON document."""
        return asdict(self)


def write_state(path: Path, state: StackState) -> None:
    """Replace the state file atomically (a reader never sees half a file)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(state.to_json(), indent=2))
    os.replace(scratch, path)


def read_state(path: Path) -> StackState | None:
    """The recorded state, or None if there is no (readable) state file."""
    try:
        raw = json.loads(path.read_text())
        processes = [ProcessState(**entry) for entry in raw.pop("processes")]
        return StackState(**raw, processes=processes)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _clock(seconds: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else "-"


def describe_status(state: StackState | None, data_dir: Path) -> tuple[str, int]:
    """The text `visionyard status` prints and its exit code (0 all running, 1 some not, 3 no stack)."""
    where = Path(data_dir).resolve()
    if state is None:
        return f"no Visionyard stack is running in {where} (no {STATE_FILE} there)", 3
    if not state.alive:
        left = [f"{process.name} (pid {process.pid})" for process in state.processes if process.alive]
        aftermath = (f"still running: {', '.join(left)}" if left
                     else "none of the processes it started is left")
        return (f"no Visionyard stack is running in {where}: the `visionyard up` that ran there (pid {state.pid}) "
                f"is gone without stopping; {aftermath}"), 3
    lines = [
        f"Visionyard is running in {state.data_dir} (up pid {state.pid}, since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.started_at))})",
        f"  API:  {state.api_url}",
        f"  NATS: {state.nats_url}",
        f"  logs: {state.logs_dir}",
        "",
        f"  {'PROCESS':<13} {'STATE':<14} {'PID':>7}  {'RESTARTS':>8}  LAST EXIT",
    ]
    healthy = True
    for process in state.processes:
        shown = process.state
        if shown in ("running",) and not process.alive:
            shown = "exited"  # the supervisor has not noticed yet
        healthy = healthy and shown == "running"
        pid = str(process.pid) if process.pid and process.alive else "-"
        last = "-" if process.last_exit_at is None else f"code {process.last_exit_code} at {_clock(process.last_exit_at)}"
        lines.append(f"  {process.name:<13} {shown:<14} {pid:>7}  {process.restarts:>8}  {last}")
    return "\n".join(lines), 0 if healthy else 1
