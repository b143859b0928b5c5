"""Trainer subprocesses: argv (never a shell), own process group, scrubbed env, SDK pipe, captured output."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import AsyncIterator

from visionyard.runner.ports import LaunchSpec
from visionyard.shared.deathsignal import death_signal_prefix
from visionyard.shared.deathsignal import die_with_parent as _die_with_parent

LINE_LIMIT = 4 * 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36


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


class SubprocessLauncher:
    """Starts trainers with asyncio subprocess APIs."""

    def __init__(self) -> None:
        become_child_subreaper()
        # A trainer runs in its own session, so only this signal stops it if the runner is killed: an
        # orphan would keep training, unread, while another runner resumes the job (two trainers, one job).
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
