"""Fixtures of the fault-injection suite: moto's S3 server, one stack run by `visionyard up` exactly as a
user runs it (2 runners, S3 storage, short ack waits) shared by every scenario, a REST client, the digits
dataset, and the figures sink. The scenarios kill processes; `up` alone brings them back."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from visionyard.cli.stack import admin_nats_url
from visionyard.cli.stackstate import (
    ProcessState,
    StackState,
    process_start_ticks,
    read_state,
    state_path,
)
from visionyard.shared.natsserver import free_port

from ..jobproof import S3_KEY, s3_client, upload_digits

INTERNAL_BUCKET = "faults-internal"
EXTERNAL_BUCKET = "faults-external"
# Short enough that a crashed consumer's fetched messages come back in seconds, long enough that a
# busy but healthy service on a 2-core machine never loses a message it is working on.
ACK_WAITS = {"runner": 4.0, "tracker": 6.0, "storage-artifacts": 6.0, "api-projector": 6.0}

FIGURES: list[dict[str, Any]] = []


class UpStack:
    """A running `visionyard up`, its processes seen through the state file it keeps (`visionyard status`)."""

    def __init__(self, *, process: subprocess.Popen[str], data_dir: Path, api_url: str, reports: Path) -> None:
        self.process = process
        self.data_dir = data_dir
        self.api_url = api_url
        self.reports_path = reports

    def state(self) -> StackState:
        """What `up` last recorded."""
        state = read_state(state_path(self.data_dir))
        assert state is not None and state.alive, "visionyard up is not running"
        return state

    @property
    def nats_url(self) -> str:
        """The stack's broker, with the admin credentials `up` generated (the services have their own)."""
        return admin_nats_url(self.data_dir, self.state().nats_url)

    @property
    def tracking_uri(self) -> str:
        """The MLflow store the tracker writes."""
        return self.state().tracking_uri

    def pid(self, name: str) -> int:
        """The live pid of process `name` (`nats-server`, `api`, `runner-1`, ...)."""
        process = self.state().process(name)
        assert process.pid is not None and process.alive, process
        return process.pid

    def name_of(self, pid: int) -> str:
        """Which supervised process `pid` is."""
        return next(p.name for p in self.state().processes if p.pid == pid)

    def restarts(self) -> dict[str, int]:
        """Restarts so far, by process name."""
        return {p.name: p.restarts for p in self.state().processes}

    def kill(self, name: str) -> int:
        """`kill -9` process `name` and wait until it is gone; its pid."""
        pid = self.pid(name)
        ticks = process_start_ticks(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start_ticks(pid) == ticks and ticks is not None:
            assert time.monotonic() < deadline, f"{name} (pid {pid}) survived SIGKILL"
            time.sleep(0.02)
        return pid

    def wait_restarted(self, name: str, old_pid: int, *, timeout: float = 60.0) -> ProcessState:
        """Until `up` runs `name` again under a new pid."""
        deadline = time.monotonic() + timeout
        while True:
            process = self.state().process(name)
            if process.pid not in (None, old_pid) and process.state == "running" and process.alive:
                return process
            assert time.monotonic() < deadline, f"up did not restart {name}: {process}"
            time.sleep(0.1)

    def reports(self) -> str:
        """What `up` reported on stderr (exits, crash loops)."""
        return self.reports_path.read_text()


def descendants(root: int) -> list[int]:
    """Pids of every live process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found: list[int] = []
    pending = [root]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[UpStack]:
    """`visionyard up --runners 2` with S3 storage (moto): nats-server, api, tracker, storage, two runners."""
    root = tmp_path_factory.mktemp("faults-stack")
    data_dir = root / "data"
    api_port = free_port()
    env = {
        **os.environ,
        "VISIONYARD_STORAGE_S3_ACCESS_KEY_ID": S3_KEY,
        "VISIONYARD_STORAGE_S3_SECRET_ACCESS_KEY": S3_KEY,
        "VISIONYARD_TOPOLOGY_ACK_WAITS": json.dumps(ACK_WAITS),
        "VISIONYARD_RUNNER_HEARTBEAT_SECONDS": "1",
        # Every checkpoint staged (no cadence): the scenarios strike a 6-epoch job between its
        # second checkpoint and its end, and epochs here are shorter than any useful interval.
        "VISIONYARD_RUNNER_CHECKPOINT_INTERVAL_SECONDS": "0",
        "VISIONYARD_RUNNER_SLOTS": "1",
        "VISIONYARD_RUNNER_CANCEL_GRACE_SECONDS": "5",
    }
    argv = [str(Path(sys.executable).with_name("visionyard")), "up", "--data-dir", str(data_dir),
            "--api-port", str(api_port), "--runners", "2", "--storage-backend", "s3",
            "--s3-endpoint-url", s3_endpoint, "--internal-bucket", INTERNAL_BUCKET,
            "--external-bucket", EXTERNAL_BUCKET]
    reports = root / "up.stderr"
    with reports.open("w") as errors:
        up = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, text=True,
                              env=env)
    try:
        _Output(up, root / "up.stdout").wait_for("Press Ctrl-C", timeout=180)
        yield UpStack(process=up, data_dir=data_dir, api_url=f"http://127.0.0.1:{api_port}", reports=reports)
        started = descendants(up.pid)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0, reports.read_text()
        assert [pid for pid in started if process_start_ticks(pid) is not None] == [], "up left processes behind"
        # Every service ran as its own NATS user through every fault: none was refused anything it needed.
        log = (data_dir / "logs" / "nats-server.log").read_text(errors="replace")
        assert [line for line in log.splitlines() if "Violation" in line] == []
    finally:
        if up.poll() is None:
            up.kill()  # every process it started dies with it
            up.wait()


class _Output:
    """`up`'s stdout, read by a thread (so it never blocks on a full pipe) into a file, lines announced."""

    def __init__(self, up: subprocess.Popen[str], path: Path) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        threading.Thread(target=self._read, args=(up, path), daemon=True).start()

    def _read(self, up: subprocess.Popen[str], path: Path) -> None:
        assert up.stdout is not None
        with path.open("w") as sink:
            for line in up.stdout:
                sink.write(line)
                sink.flush()
                self._lines.put(line.rstrip())
        self._lines.put(None)

    def wait_for(self, text: str, *, timeout: float) -> None:
        """Until a line contains `text`; fail if `up` exits or stays silent for `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no {text!r} from visionyard up within {timeout}s: {self._seen}") from None
            assert line is not None, f"visionyard up exited before {text!r}: {self._seen}"
            self._seen.append(line)
            if text in line:
                return


@pytest.fixture(scope="session")
def api(stack: UpStack) -> Iterator[httpx.Client]:
    """A REST client of the stack's API."""
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def dataset_id(api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits ImageFolder, uploaded and ready."""
    return upload_digits(api, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every scenario's measured figures are written (JSON list)."""
    return tmp_path_factory.getbasetemp() / "fault-figures.json"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print each scenario's figures at the end of the run, so CI logs carry them without `-s`."""
    if not FIGURES:
        return
    terminalreporter.section("fault-injection figures")
    for figure in FIGURES:
        terminalreporter.write_line(json.dumps(figure, sort_keys=True))


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> dict[str, Any]:
    """A boto3 client of moto's S3 and the bucket checkpoints are stored in."""
    return {"client": s3_client(s3_endpoint), "bucket": INTERNAL_BUCKET}


@pytest.fixture(scope="session")
def figures() -> list[dict[str, Any]]:
    """Figures recorded by the scenarios, printed in the terminal summary."""
    return FIGURES
