"""Trainer subprocesses: argv (never a shell), own process group, scrubbed env, SDK pipe, captured output."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

from visionyard.runner.service import LaunchSpec

LINE_LIMIT = 4 * 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


class SubprocessTrainer:
    """A started trainer: its process group, its three line streams, and how to stop it."""

    def __init__(self, process: asyncio.subprocess.Process, sdk: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self._process = process
        self.pid = process.pid
        self._lines: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._transport = transport
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read("sdk", sdk)),
            asyncio.create_task(self._read("stdout", process.stdout)),
            asyncio.create_task(self._read("stderr", process.stderr)),
        ]

    async def _read(self, name: str, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:
                    # A line longer than the limit: take what is buffered rather than stall the pipe.
                    raw = await reader.read(LINE_LIMIT)
                if not raw:
                    break
                await self._lines.put((name, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
        finally:
            await self._lines.put((name, None))

    async def lines(self) -> AsyncIterator[tuple[str, str]]:
        """(`sdk`|`stdout`|`stderr`, line) in arrival order, until all three streams close."""
        open_streams = len(self._readers)
        while open_streams:
            name, text = await self._lines.get()
            if text is None:
                open_streams -= 1
                continue
            yield name, text
        self._transport.close()

    async def wait(self) -> int:
        """The exit status (negative: the signal that killed it)."""
        return await self._process.wait()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def stop(self, *, grace: float) -> int:
        """SIGTERM the group, wait `grace`, SIGKILL the group, reap."""
        if self._process.returncode is None and grace > 0:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout=grace)
        # Even after the leader exited, children it left in the group are killed here.
        self._signal_group(signal.SIGKILL)
        code = await self._process.wait()
        await _reap_group(self.pid)
        # Members of the group hold the pipes open; once killed, the readers reach EOF.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), timeout=5)
        for reader in self._readers:
            reader.cancel()
        return code


async def _reap_group(pgid: int, *, bound: float = 5.0) -> None:
    """Reap the group's orphans, which this process adopted as child subreaper, so no zombie remains."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while loop.time() < deadline:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return  # no child of ours is left in that group
        if pid == 0:
            await asyncio.sleep(0.02)  # killed, not yet dead


def become_child_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so grandchildren of a trainer can be reaped here."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except OSError:
        return False


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A pre-exec hook: the trainer is SIGKILLed if the runner dies (kill -9 included).

    The trainer runs in its own session, so nothing else would stop it: an orphan would keep training
    with nobody reading its events while another runner resumes the job (two trainers, one job).
    Only used where `setpriv` is missing (see `death_signal_prefix`).
    """

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the runner died before the signal was armed
            os._exit(1)

    return arm


def death_signal_prefix() -> list[str] | None:
    """`setpriv --pdeathsig KILL --` (util-linux 2.33+) when it works here, else None.

    The same parent-death signal as `_die_with_parent`, set by an exec'd helper instead of a Python
    pre-exec hook. A pre-exec hook makes `subprocess` fork the runner (copying its page tables, then
    copy-on-write faults in the runner) instead of using vfork: measured at ~7 ms of the runner's CPU
    per trainer with ~100 MB resident, against ~0.2 ms (bench/PROFILE.md, round 4). setpriv cannot check
    that the runner is still alive once the signal is armed, so a runner dying within that millisecond
    leaves its trainer running until it next writes an event to the closed pipe (which ends it).
    """
    if not sys.platform.startswith("linux"):
        return None
    setpriv, true = shutil.which("setpriv"), shutil.which("true")
    if setpriv is None or true is None:
        return None
    prefix = [setpriv, "--pdeathsig", "KILL", "--"]
    try:
        probe = subprocess.run([*prefix, true], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if probe.returncode == 0 else None


class SubprocessLauncher:
    """Starts trainers with asyncio subprocess APIs."""

    def __init__(self) -> None:
        become_child_subreaper()
        self._death_signal = death_signal_prefix()

    async def launch(self, spec: LaunchSpec) -> SubprocessTrainer:
        """Spawn `spec.argv` in its own session with the SDK pipe on an inherited fd."""
        read_fd, write_fd = os.pipe()
        argv = [*self._death_signal, *spec.argv] if self._death_signal else list(spec.argv)
        on_linux = sys.platform.startswith("linux")
        try:
            env = {**spec.env, "VISIONYARD_EVENTS_FD": str(write_fd)}
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=spec.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()) if on_linux and not self._death_signal else None,
                limit=LINE_LIMIT,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            # Only the child keeps the write end, so the runner sees EOF when the trainer is gone.
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        return SubprocessTrainer(process, reader, transport)
