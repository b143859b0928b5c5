"""The safe-archive layer: checks an uploaded zip, plans ImageFolder layouts, writes normalized archives.

The archive is untrusted input. Everything is decided from the zip's central directory first
(paths, links, sizes, layout) so a hostile archive is refused before a byte is extracted; then each
image is extracted on its own, counting bytes against the declared sizes (the central directory can
lie), decoded with Pillow, hashed, and copied into a normalized archive. Nothing here touches a bucket:
the caller stores the result only when the whole archive passed.

Format detection (ImageFolder, YOLO, COCO, DICE) lives in `visionyard.storage.formats`; every format
goes through the same entry checks (`safe_entries`), member reads (`read_member`) and normalized
writer (`write_normalized`) defined here.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

FORMAT = "imagefolder"
TASK_TYPES = ["image_classification"]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow may only parse these formats: several others (EPS above all) hand the bytes to external
# programs, which an uploaded file must never reach.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# Folders that carry meaning in some format, so they are never taken for a wrapper folder.
RESERVED_FOLDERS = frozenset({"images", "labels", "annotations"})
# Files that mark a format's root (data.yaml, an annotations JSON): a folder holding one directly
# is a wrapper around the dataset, not a class folder.
MARKER_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
# A small file with a high ratio (a flat-colour BMP) harms nobody; bombs need volume, so the ratio
# limit applies to members (and archives) that expand to at least this much.
RATIO_FLOOR_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """What an upload may cost us."""

    max_upload_bytes: int = 2 * 1024**3
    max_uncompressed_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0
    max_files: int = 200_000


class ArchiveRejected(Exception):
    """The archive is unsafe or not a usable ImageFolder dataset; `reason` names the file and problem."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InspectedDataset:
    """An accepted dataset: its statistics, content hash and normalized archive on local disk."""

    content_hash: str
    class_names: list[str]
    class_counts: dict[str, int]
    splits: dict[str, int]
    num_images: int
    archive: Path
    archive_sha256: str
    size_bytes: int
    format: str = FORMAT
    task_types: list[str] = field(default_factory=lambda: list(TASK_TYPES))
    num_annotations: int = 0
    # (relative path, bytes) of every image in the normalized archive, sorted by path.
    image_files: tuple[tuple[str, int], ...] = ()

    def manifest(self) -> dict[str, Any]:
        """The JSON stored beside the archive (and the stats of `DatasetReady`)."""
        return {
            "content_hash": self.content_hash,
            "format": self.format,
            "task_types": self.task_types,
            "num_images": self.num_images,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "splits": self.splits,
            "num_annotations": self.num_annotations,
            "size_bytes": self.size_bytes,
            "archive_sha256": self.archive_sha256,
        }


@dataclass(frozen=True)
class Entry:
    """A safe regular file of the archive and its path parts (after dropping a wrapper folder)."""

    info: zipfile.ZipInfo
    parts: list[str]

    @property
    def path(self) -> str:
        """The normalized relative path."""
        return "/".join(self.parts)


@dataclass(frozen=True)
class PlannedFile:
    """One file of the normalized archive: an image to decode, or annotation bytes already read."""

    info: zipfile.ZipInfo
    path: str
    data: bytes | None = None


@dataclass(frozen=True)
class DatasetPlan:
    """What a format check decided: which files to keep and the statistics they give."""

    format: str
    task_types: list[str]
    images: list[PlannedFile]
    class_names: list[str]
    class_counts: dict[str, int]
    splits: dict[str, int]
    annotations: list[PlannedFile] = field(default_factory=list)
    num_annotations: int = 0


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    path: str
    split: str | None
    class_name: str


def check_upload_file(source: Path, *, limits: ArchiveLimits, label: str) -> None:
    """Refuse an upload that is too big or not a zip at all, before opening it."""
    size = source.stat().st_size
    if size > limits.max_upload_bytes:
        raise ArchiveRejected(f"{label} is {size} bytes; uploads are limited to {limits.max_upload_bytes} bytes")
    if not zipfile.is_zipfile(source):
        raise ArchiveRejected(f"{label} is not a zip archive")


def safe_entries(archive: zipfile.ZipFile, limits: ArchiveLimits) -> list[Entry]:
    """The archive's regular files, decided from the central directory alone; refuses unsafe archives.

    Rejects absolute paths, traversal, links, encrypted entries, duplicate names, too many entries
    and declared sizes or ratios over the limits; drops OS litter and one wrapper folder.
    """
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise ArchiveRejected(f"archive holds {len(infos)} entries; the limit is {limits.max_files}")
    files: list[tuple[zipfile.ZipInfo, list[str]]] = []
    directories: list[list[str]] = []
    seen: dict[str, str] = {}
    for info in infos:
        _check_entry_is_safe(info)
        parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
        if not parts or _is_ignored(parts):
            continue
        if info.is_dir():
            directories.append(parts)
            continue
        # Case-insensitive: two names that differ only by case collide on macOS/Windows disks.
        folded = "/".join(parts).casefold()
        if folded in seen:
            raise ArchiveRejected(f"{info.filename}: duplicate name in archive (same as {seen[folded]})")
        seen[folded] = info.filename
        files.append((info, parts))
    if not files:
        raise ArchiveRejected("archive holds no images")
    _check_declared_sizes([info for info, _ in files], limits)
    files, directories = _strip_wrapper_folder(files, directories)
    entries = [Entry(info=info, parts=parts) for info, parts in files]
    # Empty folders matter to ImageFolder (an empty class); they ride along as zero-part markers.
    return entries + [Entry(info=zipfile.ZipInfo("/".join(parts) + "/"), parts=parts) for parts in directories]


def files_of(entries: list[Entry]) -> list[Entry]:
    """The regular files among `safe_entries`' result."""
    return [entry for entry in entries if not entry.info.is_dir()]


def _check_entry_is_safe(info: zipfile.ZipInfo) -> None:
    name = info.filename
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _WINDOWS_DRIVE.match(normalized):
        raise ArchiveRejected(f"{name}: absolute path in archive")
    if ".." in normalized.split("/"):
        raise ArchiveRejected(f"{name}: path traversal ('..') in archive")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveRejected(f"{name}: symbolic link in archive")
    if info.flag_bits & 0x1:
        raise ArchiveRejected(f"{name}: encrypted entry in archive")


def _is_ignored(parts: list[str]) -> bool:
    # Hidden files (".DS_Store", "._x.png" AppleDouble files) and OS litter are not dataset content.
    return any(part.startswith(".") or part in IGNORED_NAMES for part in parts)


def _check_declared_sizes(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    total = sum(info.file_size for info in infos)
    if total > limits.max_uncompressed_bytes:
        raise ArchiveRejected(
            f"archive expands to {total} bytes; the limit is {limits.max_uncompressed_bytes} bytes (zip bomb?)"
        )
    for info in infos:
        _check_ratio(info.filename, info.file_size, info.compress_size, limits)
    compressed = sum(info.compress_size for info in infos)
    if total >= RATIO_FLOOR_BYTES and total > limits.max_compression_ratio * max(compressed, 1):
        raise ArchiveRejected(
            f"archive compression ratio {total / max(compressed, 1):.0f}:1 exceeds the limit of "
            f"{limits.max_compression_ratio:.0f}:1 (zip bomb?)"
        )


def _check_ratio(name: str, expanded: int, compressed: int, limits: ArchiveLimits) -> None:
    if expanded >= RATIO_FLOOR_BYTES and expanded > limits.max_compression_ratio * max(compressed, 1):
        raise ArchiveRejected(
            f"{name}: compression ratio {expanded / max(compressed, 1):.0f}:1 exceeds the limit of "
            f"{limits.max_compression_ratio:.0f}:1 (zip bomb?)"
        )


def _strip_wrapper_folder(
    files: list[tuple[zipfile.ZipInfo, list[str]]], directories: list[list[str]]
) -> tuple[list[tuple[zipfile.ZipInfo, list[str]]], list[list[str]]]:
    """Drop one top-level folder that wraps everything (`mydata/cats/1.png`, `mydata/data.yaml`).

    Never a split or format folder, and never the only class folder of an ImageFolder (whose
    images sit directly in it): that is a one-class dataset, which the layout check refuses.
    """
    tops = {parts[0] for _, parts in files}
    if len(tops) != 1:
        return files, directories
    top = next(iter(tops))
    if top.lower() in SPLIT_NAMES or top.lower() in RESERVED_FOLDERS:
        return files, directories
    shallow = [parts for _, parts in files if len(parts) < 3]
    if shallow and not any(PurePosixPath(parts[-1]).suffix.lower() in MARKER_SUFFIXES for parts in shallow):
        return files, directories
    stripped_dirs = [parts[1:] for parts in directories if parts[0] == top and len(parts) > 1]
    return [(info, parts[1:]) for info, parts in files], stripped_dirs


def plan_imagefolder(entries: list[Entry]) -> DatasetPlan:
    """Class folders (optionally under train/val/test folders) of images: image classification."""
    files = files_of(entries)
    directories = [entry.parts for entry in entries if entry.info.is_dir()]
    split_layout = all(entry.parts[0].lower() in SPLIT_NAMES for entry in files)
    depth = 3 if split_layout else 2
    members: list[_Member] = []
    for entry in files:
        info, parts = entry.info, entry.parts
        suffix = PurePosixPath(parts[-1]).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise ArchiveRejected(
                f"{info.filename}: not an image file (extension {suffix or 'none'!r}; "
                f"expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if len(parts) != depth:
            layout = "<split>/<class>/<image>" if split_layout else "<class>/<image> or <split>/<class>/<image>"
            raise ArchiveRejected(f"{info.filename}: not where an ImageFolder image belongs ({layout})")
        split = SPLIT_NAMES[parts[0].lower()] if split_layout else None
        members.append(_Member(info=info, path="/".join(parts), split=split, class_name=parts[-2]))

    classes = {member.class_name for member in members}
    declared = {tuple(parts) for parts in directories if len(parts) == depth - 1}
    for folder in sorted(declared):
        if split_layout and folder[0].lower() not in SPLIT_NAMES:
            continue
        if folder[-1] not in classes:
            raise ArchiveRejected(f"class folder {'/'.join(folder)}/ is empty: every class needs images")
    if split_layout and any(member.split == "train" for member in members):
        trained = {member.class_name for member in members if member.split == "train"}
        for missing in sorted(classes - trained):
            raise ArchiveRejected(f"class {missing!r} has no images in the train split")
    if len(classes) < 2:
        found = ", ".join(sorted(classes))
        raise ArchiveRejected(
            f"found {len(classes)} class folder ({found}); image classification needs at least 2 classes"
        )
    members.sort(key=lambda member: member.path)
    class_counts: dict[str, int] = {}
    split_counts: dict[str, int] = {}
    for member in members:
        class_counts[member.class_name] = class_counts.get(member.class_name, 0) + 1
        if member.split is not None:
            split_counts[member.split] = split_counts.get(member.split, 0) + 1
    return DatasetPlan(
        format=FORMAT,
        task_types=list(TASK_TYPES),
        images=[PlannedFile(info=member.info, path=member.path) for member in members],
        class_names=sorted(class_counts),
        class_counts=dict(sorted(class_counts.items())),
        splits=dict(sorted(split_counts.items())),
    )


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limits: ArchiveLimits, cap: int) -> bytes:
    """A small member's bytes (annotation files), refusing more than `cap` or than it declared."""
    if info.file_size > cap:
        raise ArchiveRejected(f"{info.filename}: {info.file_size} bytes; annotation files are limited to {cap} bytes")
    chunks: list[bytes] = []
    expanded = 0
    try:
        with archive.open(info) as source:
            while chunk := source.read(_CHUNK):
                expanded += len(chunk)
                if expanded > info.file_size or expanded > cap:
                    raise ArchiveRejected(f"{info.filename}: expands beyond its declared size (zip bomb?)")
                _check_ratio(info.filename, expanded, info.compress_size, limits)
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise ArchiveRejected(f"{info.filename}: damaged or unsupported zip entry ({error})") from error
    return b"".join(chunks)


def write_normalized(
    archive: zipfile.ZipFile, plan: DatasetPlan, *, workdir: Path, limits: ArchiveLimits
) -> InspectedDataset:
    """Extract, decode and hash each image, copy it and the annotation files into a deterministic archive."""
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "member.bin"
    target = workdir / "dataset.zip"
    hashed: list[tuple[str, str]] = []
    image_files: list[tuple[str, int]] = []
    expanded_total = sum(len(item.data or b"") for item in plan.annotations)
    # Stored, not deflated: images are compressed already. Fixed timestamps and sorted order make
    # the archive's bytes a function of its content.
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as normalized:
        for item in sorted(plan.images + plan.annotations, key=lambda planned: planned.path):
            entry = zipfile.ZipInfo(item.path, date_time=_FIXED_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_STORED
            entry.external_attr = 0o100644 << 16
            if item.data is not None:
                entry.file_size = len(item.data)
                normalized.writestr(entry, item.data)
                hashed.append((item.path, hashlib.sha256(item.data).hexdigest()))
                continue
            sha256, expanded = _extract_member(
                archive, item.info, scratch, limits=limits, budget=limits.max_uncompressed_bytes - expanded_total
            )
            expanded_total += expanded
            _check_image_decodes(scratch, item.info.filename)
            entry.file_size = expanded
            with scratch.open("rb") as source, normalized.open(entry, "w") as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
            hashed.append((item.path, sha256))
            image_files.append((item.path, expanded))
    scratch.unlink(missing_ok=True)

    content = hashlib.sha256()
    for path, sha256 in sorted(hashed):
        content.update(path.encode() + b"\0" + sha256.encode() + b"\n")
    return InspectedDataset(
        content_hash=content.hexdigest(),
        class_names=list(plan.class_names),
        class_counts=dict(plan.class_counts),
        splits=dict(plan.splits),
        num_images=len(plan.images),
        archive=target,
        archive_sha256=_sha256_file(target),
        size_bytes=target.stat().st_size,
        format=plan.format,
        task_types=list(plan.task_types),
        num_annotations=plan.num_annotations,
        image_files=tuple(sorted(image_files)),
    )


def _extract_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, *, limits: ArchiveLimits, budget: int
) -> tuple[str, int]:
    """Stream one member to disk, counting real bytes (the central directory may lie)."""
    digest = hashlib.sha256()
    expanded = 0
    try:
        with archive.open(info) as source, destination.open("wb") as sink:
            while chunk := source.read(_CHUNK):
                expanded += len(chunk)
                if expanded > info.file_size:
                    raise ArchiveRejected(f"{info.filename}: expands beyond its declared size (zip bomb?)")
                if expanded > budget:
                    raise ArchiveRejected(
                        f"{info.filename}: archive expands beyond {limits.max_uncompressed_bytes} bytes (zip bomb?)"
                    )
                _check_ratio(info.filename, expanded, info.compress_size, limits)
                digest.update(chunk)
                sink.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise ArchiveRejected(f"{info.filename}: damaged or unsupported zip entry ({error})") from error
    return digest.hexdigest(), expanded


def _check_image_decodes(path: Path, name: str) -> None:
    """Decode fully: `verify` checks the structure, `load` the pixel data (truncation shows here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PILLOW_FORMATS) as image:
                image.verify()
            with Image.open(path, formats=PILLOW_FORMATS) as image:
                image.load()
    except Exception as error:  # Pillow raises many types for bad input; all mean "not an image"
        detail = str(error).replace(str(path), name)  # never leak our scratch path to the user
        raise ArchiveRejected(f"{name}: not a readable image ({type(error).__name__}: {detail})") from error


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
