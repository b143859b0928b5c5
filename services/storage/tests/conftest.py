"""Fixtures of the storage tests: generated images and zips, and a real S3 endpoint (moto_server)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

def png_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> bytes:
    """A small valid PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(colour: tuple[int, int, int] = (10, 120, 250)) -> bytes:
    """A small valid JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def images() -> dict[str, Callable[..., bytes]]:
    """Image byte factories."""
    return {"png": png_bytes, "jpeg": jpeg_bytes}


@pytest.fixture
def make_zip(tmp_path: Path) -> Callable[..., Path]:
    """Write a zip from `(name, bytes)` pairs (or a ready `ZipInfo` for odd entries)."""
    counter = iter(range(10_000))

    def build(entries: list[tuple[str | zipfile.ZipInfo, bytes]], *, name: str | None = None) -> Path:
        path = tmp_path / (name or f"upload-{next(counter)}.zip")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for arcname, data in entries:
                archive.writestr(arcname, data)
        return path

    return build


@pytest.fixture
def flat_dataset() -> list[tuple[str, bytes]]:
    """A valid flat ImageFolder: 2 classes, 5 images."""
    return [
        ("cats/a.png", png_bytes((255, 0, 0))),
        ("cats/b.png", png_bytes((250, 0, 0))),
        ("cats/c.jpg", jpeg_bytes((240, 10, 0))),
        ("dogs/a.png", png_bytes((0, 0, 255))),
        ("dogs/b.jpeg", jpeg_bytes((0, 10, 240))),
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint on loopback: moto's standalone server as a subprocess."""
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        pytest.skip("moto_server is not installed in this venv")
    port = _free_port()
    log_file = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}: {log_file.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("moto_server did not answer") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
