"""Child processes that die with their parent (Linux parent-death signal), `kill -9` of the parent included.

Used by the runner (a trainer must not keep training once its runner is gone) and by the embedded stack
(`visionyard up`: nats-server and the services must not outlive it). Two ways to arm the signal:
`setpriv --pdeathsig SIG --` (util-linux) prefixed to argv, or a pre-exec hook where setpriv is missing.
The signal fires when the *thread* that spawned the child exits, so spawn from a long-lived thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A pre-exec hook arming `signum` on the parent's death; exits at once if the parent is already gone.

    Only for where `death_signal_prefix` returns None: a pre-exec hook makes `subprocess` fork the
    parent (copying its page tables) instead of using vfork.
    """

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def death_signal_prefix(signal_name: str = "KILL") -> list[str] | None:
    """`setpriv --pdeathsig <signal_name> --` (util-linux 2.33+) when it works here, else None.

    The same parent-death signal as `die_with_parent`, set by an exec'd helper instead of a Python
    pre-exec hook. A pre-exec hook makes `subprocess` fork the parent instead of using vfork: measured
    at ~7 ms of the runner's CPU per trainer with ~100 MB resident, against ~0.2 ms (bench/PROFILE.md,
    round 4). setpriv cannot check that the parent is still alive once the signal is armed, so a parent
    dying within that millisecond leaves the child running. Probed once per signal and process.
    """
    prefix = _probe_setpriv(signal_name)
    return list(prefix) if prefix is not None else None


@functools.cache
def _probe_setpriv(signal_name: str) -> tuple[str, ...] | None:
    if not sys.platform.startswith("linux"):
        return None
    setpriv, true = shutil.which("setpriv"), shutil.which("true")
    if setpriv is None or true is None:
        return None
    prefix = (setpriv, "--pdeathsig", signal_name, "--")
    try:
        probe = subprocess.run([*prefix, true], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if probe.returncode == 0 else None


def dying_with_parent(argv: list[str], *, signal_name: str = "KILL") -> tuple[list[str], Callable[[], None] | None]:
    """(argv, preexec_fn) for `subprocess.Popen` so the child gets SIG`signal_name` when this process dies."""
    if not sys.platform.startswith("linux"):
        return list(argv), None
    prefix = death_signal_prefix(signal_name)
    if prefix is not None:
        return [*prefix, *argv], None
    return list(argv), die_with_parent(os.getpid(), getattr(signal, f"SIG{signal_name}"))
