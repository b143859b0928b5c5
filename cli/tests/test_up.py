"""`visionyard up` as a user runs it (the real services): it stops on SIGINT even when started with SIGINT
ignored (a script's background job), and a `kill -9` of it leaves none of its processes behind."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from visionyard.cli.stackstate import read_state, state_path
from visionyard.shared.natsserver import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]

VISIONYARD = str(Path(sys.executable).with_name("visionyard"))


def descendants(root: int) -> dict[int, str]:
    """pid → command line of every live (non-zombie) process below `root`."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            commands[int(entry.name)] = command
    found: dict[int, str] = {}
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found[child] = commands[child]
            pending.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_line(up: subprocess.Popen[str], text: str, *, timeout: float = 120.0) -> list[str]:
    """Read `up`'s stdout until a line contains `text`; fail if it exits or stays silent too long.

    A thread reads (a blocking readline cannot time out); the rest of the output goes unread, which the
    pipe's buffer holds: `up` prints a few lines after start-up.
    """
    assert up.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.put(line.rstrip())
            if text in line:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise AssertionError(f"no {text!r} from visionyard up within {timeout}s: {seen}") from None
        assert line is not None, f"visionyard up exited ({up.wait()}) before {text!r}; it printed: {seen}"
        seen.append(line)
        if text in line:
            return seen


def status(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`visionyard status` for `data_dir`."""
    return subprocess.run([VISIONYARD, "status", "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory; anything a failed test left running under `up` is killed at the end."""
    yield tmp_path / "data"
    state = read_state(state_path(tmp_path / "data"))
    if state is not None and state.alive:
        os.kill(state.pid, signal.SIGKILL)


def start_up(data_dir: Path, *extra: str, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """`visionyard up` on free ports, as a child of the test."""
    argv = [VISIONYARD, "up", "--data-dir", str(data_dir), "--api-port", str(free_port()), *extra]

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ignore_sigint if sigint_ignored else None)


def test_up_started_with_sigint_ignored_still_stops_everything_on_sigint(data_dir: Path) -> None:
    up = start_up(data_dir, sigint_ignored=True)
    try:
        wait_for_line(up, "Press Ctrl-C")
        running = status(data_dir)
        assert running.returncode == 0, running.stdout
        started = descendants(up.pid)
        names = " ".join(started.values())
        for service in ("nats-server", "visionyard-api", "visionyard-tracker", "visionyard-storage",
                        "visionyard-runner"):
            assert service in names, started
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    assert [pid for pid in started if alive(pid)] == []
    assert not state_path(data_dir).exists()
    stopped = status(data_dir)
    assert stopped.returncode == 3 and "no Visionyard stack is running" in stopped.stdout


def test_kill_9_of_up_leaves_no_process_behind_mlflow_ui_included(data_dir: Path) -> None:
    mlflow_port = free_port()
    up = start_up(data_dir, "--mlflow-ui", "--mlflow-port", str(mlflow_port))
    try:
        wait_for_line(up, "Press Ctrl-C")
        # The UI's web server is a child of `mlflow ui`: wait until it answers, so it exists to be orphaned.
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and up.poll() is None, "the MLflow UI did not come up"
            time.sleep(0.2)
        started = descendants(up.pid)
        assert len(started) >= 7, started  # nats, api, tracker, storage, runner, mlflow ui and its server
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
    finally:
        if up.poll() is None:
            up.kill()
    deadline = time.monotonic() + 30
    while [pid for pid in started if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {pid: command for pid, command in started.items() if alive(pid)} == {}
    left = status(data_dir)
    assert left.returncode == 3 and "is gone without stopping; none of the processes it started is left" in left.stdout
