"""ImageFolder loading with Pillow and numpy: class folders in, normalized arrays out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
VAL_DIR_NAMES = ("val", "valid", "validation")


class DatasetError(Exception):
    """The dataset cannot be trained on (empty, one class, unreadable image): a user error."""


@dataclass(frozen=True)
class Split:
    """Images (N, H, W, C) uint8, their integer labels and the files they were read from (in the same order)."""

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[Path, ...] = ()

    def subset(self, indices: np.ndarray) -> Split:
        """The images at `indices`, with their labels and files."""
        return Split(self.images[indices], self.labels[indices],
                     tuple(self.paths[int(i)] for i in indices) if self.paths else ())


@dataclass(frozen=True)
class LoadedDataset:
    """Train and validation splits with the class names and channel count they were read with."""

    train: Split
    val: Split
    class_names: list[str]
    in_channels: int
    val_from_folder: bool


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _image_files(path: Path) -> list[Path]:
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def find_root(dataset_dir: Path) -> Path:
    """The folder holding the class folders (or train/val), descending through one wrapper folder."""
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset directory {dataset_dir} does not exist")
    root = dataset_dir
    # Zips made by "compress folder" wrap everything in one top-level folder; look through it.
    for _ in range(2):
        dirs = _visible_dirs(root)
        names = {d.name.lower() for d in dirs}
        if "train" in names or len(dirs) != 1:
            break
        direct_images = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        inner = _visible_dirs(dirs[0])
        if direct_images or not inner:
            break
        root = dirs[0]
    return root


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    return {d.name: _image_files(d) for d in _visible_dirs(split_dir)}


def _read_image(path: Path, *, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


def _read_split(files: dict[str, list[Path]], class_names: list[str], *, image_size: int) -> Split:
    images: list[np.ndarray] = []
    labels: list[int] = []
    read: list[Path] = []
    index = {name: i for i, name in enumerate(class_names)}
    for name, paths in files.items():
        if name not in index:
            raise DatasetError(f"validation class {name!r} does not exist in the training split")
        for path in paths:
            images.append(_read_image(path, image_size=image_size))
            labels.append(index[name])
            read.append(path)
    if not images:
        return Split(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int64))
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(read))


def stratified_split(labels: np.ndarray, *, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split into (train indices, val indices); a class of one stays in train."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_split))
        n_val = min(n_val, len(members) - 1)
        val_idx.extend(members[:n_val].tolist())
        train_idx.extend(members[n_val:].tolist())
    return np.asarray(sorted(train_idx), dtype=np.int64), np.asarray(sorted(val_idx), dtype=np.int64)


def _files_of_split(dataset_dir: Path, paths: list[str]) -> dict[str, list[Path]]:
    """Relative image paths of a configured split, grouped by class (the image's folder name)."""
    grouped: dict[str, list[Path]] = {}
    for relative in paths:
        parts = Path(relative).parts
        if len(parts) < 2 or ".." in parts:
            raise DatasetError(f"split entry {relative!r} is not <class>/<image> inside the dataset")
        grouped.setdefault(parts[-2], []).append(dataset_dir / relative)
    return {name: sorted(files) for name, files in sorted(grouped.items())}


def load_imagefolder(
    dataset_dir: Path,
    *,
    image_size: int,
    val_split: float,
    seed: int,
    in_channels: int | None = None,
    split: dict[str, list[str]] | None = None,
) -> LoadedDataset:
    """Read `<root>/<class>/*` or `<root>/train/<class>/*` + `<root>/val/<class>/*` into memory.

    A configured `split` (`{"train": [...], "val": [...]}` paths relative to `dataset_dir`, from the
    job file) overrides both the folders and `val_split`.
    """
    if split is not None and split.get("train"):
        train_files = _files_of_split(dataset_dir, split["train"])
        class_names = sorted(train_files)
        if len(class_names) < 2:
            raise DatasetError(f"the configured train split needs at least 2 classes, found {class_names}")
        train = _read_split(train_files, class_names, image_size=image_size)
        val = _read_split(_files_of_split(dataset_dir, split.get("val", [])), class_names, image_size=image_size)
        channels = in_channels or _channels_needed(train.images)
        return LoadedDataset(train=train, val=val, class_names=class_names, in_channels=channels, val_from_folder=True)
    root = find_root(dataset_dir)
    by_name = {d.name.lower(): d for d in _visible_dirs(root)}
    val_dir = next((by_name[n] for n in VAL_DIR_NAMES if n in by_name), None)
    train_dir = by_name.get("train", root)
    train_files = {name: files for name, files in _class_files(train_dir).items() if files}
    class_names = sorted(train_files)
    if not class_names:
        raise DatasetError(f"no images found under {root} (expected <class>/<image> folders)")
    if len(class_names) < 2:
        raise DatasetError(f"need at least 2 classes with images, found {class_names}")
    train = _read_split(train_files, class_names, image_size=image_size)
    if val_dir is not None:
        val_files = {name: files for name, files in _class_files(val_dir).items() if files}
        val = _read_split(val_files, class_names, image_size=image_size)
    else:
        train_idx, val_idx = stratified_split(train.labels, val_split=val_split, seed=seed)
        val = train.subset(val_idx)
        train = train.subset(train_idx)
    channels = in_channels or _channels_needed(train.images)
    return LoadedDataset(
        train=train, val=val, class_names=class_names, in_channels=channels, val_from_folder=val_dir is not None
    )


def _channels_needed(images: np.ndarray) -> int:
    # Grayscale images were expanded to RGB on read; if every pixel has R == G == B, one channel is enough.
    if images.size and np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 1], images[..., 2]):
        return 1
    return 3


def to_channels(images: np.ndarray, in_channels: int) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, C, H, W) float32 in [0, 1] with the model's channel count."""
    data = images.astype(np.float32) / 255.0
    if in_channels == 1:
        data = data @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        data = data[..., None]
    return np.ascontiguousarray(data.transpose(0, 3, 1, 2))


def channel_stats(data: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, C, H, W) data; std is floored so constant images do not divide by 0."""
    mean = data.mean(axis=(0, 2, 3))
    std = np.maximum(data.std(axis=(0, 2, 3)), 1e-3)
    return [float(m) for m in mean], [float(s) for s in std]
