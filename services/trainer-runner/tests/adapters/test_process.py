"""Trainer processes die with their runner (kill -9 included), with setpriv's death signal or with the
pre-exec hook used where setpriv is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from visionyard.runner.adapters.process import death_signal_prefix

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")

RUNNER = """
import asyncio, sys
from pathlib import Path
from visionyard.runner.adapters.process import SubprocessLauncher
from visionyard.runner.ports import LaunchSpec

async def main():
    launcher = SubprocessLauncher()
    if sys.argv[1] == "hook":
        launcher._death_signal = None
    print("setpriv" if launcher._death_signal else "hook", flush=True)
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    trainer = await launcher.launch(LaunchSpec(argv=argv, cwd=Path("."), env={}))
    print(trainer.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "zombie" not in state


def test_setpriv_is_used_where_it_is_installed() -> None:
    # With util-linux's setpriv the spawn needs no pre-exec hook (so subprocess can vfork).
    prefix = death_signal_prefix()
    if shutil.which("setpriv") is None:
        assert prefix is None
    else:
        assert prefix is not None and prefix[1:] == ["--pdeathsig", "KILL", "--"]


@pytest.mark.parametrize("how", ["setpriv", "hook"])
def test_a_trainer_dies_when_its_runner_is_killed(how: str, tmp_path: Path) -> None:
    if how == "setpriv" and death_signal_prefix() is None:
        pytest.skip("no working setpriv on this machine; the hook case covers it")
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, how], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert runner.stdout is not None
        assert runner.stdout.readline().strip() == how
        trainer = int(runner.stdout.readline())
        time.sleep(0.3)
        assert running(trainer)
    finally:
        runner.kill()
        runner.wait()
    deadline = time.monotonic() + 10
    while running(trainer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(trainer), f"trainer {trainer} outlived its runner ({how})"
