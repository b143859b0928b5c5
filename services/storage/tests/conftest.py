"""Fixtures of the storage tests: generated images and zips, and a real S3 endpoint (moto_server)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
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


