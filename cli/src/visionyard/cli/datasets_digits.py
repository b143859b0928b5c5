"""Build a real ImageFolder dataset from scikit-learn's bundled digits (no download).

The demo, the tests and the benchmarks share it: 8x8 grayscale PNGs under `train/<digit>/` and
`val/<digit>/` (stratified 80/20) in a zip, plus a stratified ~10% `test` split kept out of the zip
in `heldout_dir` so a trained model can later be checked on images it never saw.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# A fixed timestamp makes the zip byte-identical for the same seed, so its content hash is stable.
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
HELDOUT_FRACTION = 0.1
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSummary:
    """What was built: where, how many images per split and per class, and the zip's sha256."""

    zip_path: Path
    heldout_dir: Path
    class_names: list[str]
    split_counts: dict[str, int]
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sha256: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (10 digits)."""
        return len(self.class_names)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """Encode one 8x8 image with values 0..16 as an 8-bit grayscale PNG scaled to 0..255."""
    scaled = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(scaled, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _split_indices(labels: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """Stratified held-out test split first, then 80/20 train/val of the rest."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def build_digits_imagefolder(dest_zip: Path, heldout_dir: Path, *, seed: int = 0) -> DigitsSummary:
    """Write the ImageFolder zip to `dest_zip` and the held-out test images to `heldout_dir`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images: np.ndarray = digits.images
    labels: np.ndarray = digits.target.astype(int)
    class_names = [str(name) for name in sorted(set(labels.tolist()))]
    splits = _split_indices(labels, seed=seed)

    dest_zip = Path(dest_zip)
    heldout_dir = Path(heldout_dir)
    dest_zip.parent.mkdir(parents=True, exist_ok=True)
    class_counts: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(dest_zip, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for split in ("train", "val"):
            counts = class_counts.setdefault(split, {name: 0 for name in class_names})
            for index in splits[split]:
                label = str(labels[index])
                info = zipfile.ZipInfo(f"{split}/{label}/digit-{index:04d}.png", date_time=_ZIP_TIMESTAMP)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, _png_bytes(images[index]))
                counts[label] += 1

    heldout_dir.mkdir(parents=True, exist_ok=True)
    test_counts = class_counts.setdefault("test", {name: 0 for name in class_names})
    with (heldout_dir / "labels.csv").open("w", newline="") as labels_file:
        writer = csv.writer(labels_file)
        writer.writerow(["path", "label"])
        for index in splits["test"]:
            label = str(labels[index])
            relative = Path(label) / f"digit-{index:04d}.png"
            (heldout_dir / label).mkdir(exist_ok=True)
            (heldout_dir / relative).write_bytes(_png_bytes(images[index]))
            writer.writerow([relative.as_posix(), label])
            test_counts[label] += 1

    digest = hashlib.sha256(dest_zip.read_bytes()).hexdigest()
    return DigitsSummary(
        zip_path=dest_zip,
        heldout_dir=heldout_dir,
        class_names=class_names,
        split_counts={split: len(indices) for split, indices in splits.items()},
        class_counts=class_counts,
        sha256=digest,
    )
