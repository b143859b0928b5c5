"""Run moto's standalone S3 server on a loopback port: the S3 endpoint of the test suites and benchmarks.

It is a functional stand-in for S3 (NOTES.md: not a throughput reference); `moto_server` comes from the
`moto[s3]` test dependency and is looked for beside this interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from visionyard.shared.natsserver import free_port


class MotoS3Server:
    """`moto_server` as a subprocess; `url` is its endpoint once `start()` returns."""

    def __init__(self, *, log_path: Path) -> None:
        self.log_path = log_path
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 30.0) -> MotoS3Server:
        """Start it and wait until it answers."""
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise FileNotFoundError(f"{binary} not found: install the test dependencies (moto[s3])")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("moto_server did not answer") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Terminate it (kill after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
