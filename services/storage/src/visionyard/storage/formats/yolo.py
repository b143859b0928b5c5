"""YOLO datasets: `data.yaml`, `images/[<split>/]…` and a `labels/` tree mirroring it.

A label file `labels/train/a.txt` belongs to the image `images/train/a.<ext>` (Ultralytics'
rule: the last `images` folder in the path becomes `labels`, the suffix `.txt`). The split-first
layout (`train/images/…`, `train/labels/…`) works by the same rule. An image without a label file is
a background image; a label file without an image is an error. Each line is `class cx cy w h`
(a box, normalised to [0, 1]) or `class x1 y1 x2 y2 x3 y3 …` (a polygon, instance segmentation).
"""

from __future__ import annotations

import zipfile
from pathlib import PurePosixPath
from typing import Any

import yaml

from visionyard.storage.archive import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    ArchiveLimits,
    ArchiveRejected,
    DatasetPlan,
    Entry,
    PlannedFile,
    read_member,
)

DATA_YAML_NAMES = frozenset({"data.yaml", "data.yml", "dataset.yaml", "dataset.yml"})
# Rounding in exporters puts coordinates a hair outside [0, 1]; more than this is a real error.
COORD_TOLERANCE = 1e-3
YAML_CAP = 1024 * 1024
LABEL_CAP = 16 * 1024 * 1024
# README.md, classes.txt and the like at the root ride along unchanged.
ROOT_EXTRA_SUFFIXES = frozenset({".txt", ".md"})


def is_data_yaml(entry: Entry) -> bool:
    """Whether a file is a YOLO dataset description at the dataset root."""
    return len(entry.parts) == 1 and entry.parts[0].lower() in DATA_YAML_NAMES


def plan_yolo(archive: zipfile.ZipFile, files: list[Entry], *, limits: ArchiveLimits) -> DatasetPlan:
    """Check a YOLO layout: data.yaml, every label line, every label's image; count boxes per class."""
    yaml_entries = [entry for entry in files if is_data_yaml(entry)]
    if not yaml_entries:
        raise ArchiveRejected(
            "data.yaml is missing: a YOLO dataset (it has a labels/ folder) needs data.yaml at its root "
            "with 'names' (a list, or a dict of index: name) and 'nc'"
        )
    if len(yaml_entries) > 1:
        raise ArchiveRejected(f"{yaml_entries[1].info.filename}: more than one dataset YAML at the root")
    yaml_entry = yaml_entries[0]
    yaml_bytes = read_member(archive, yaml_entry.info, limits=limits, cap=YAML_CAP)
    names = _parse_data_yaml(yaml_entry.info.filename, yaml_bytes)

    images: dict[str, Entry] = {}
    labels: list[Entry] = []
    extras: list[PlannedFile] = [PlannedFile(info=yaml_entry.info, path=yaml_entry.path, data=yaml_bytes)]
    for entry in files:
        if entry is yaml_entry:
            continue
        suffix = PurePosixPath(entry.path).suffix.lower()
        lowered = [part.lower() for part in entry.parts[:-1]]
        if "images" in lowered and suffix in IMAGE_EXTENSIONS:
            images[_label_path_of(entry.parts)] = entry
        elif "labels" in lowered and suffix == ".txt":
            labels.append(entry)
        elif len(entry.parts) == 1 and suffix in ROOT_EXTRA_SUFFIXES:
            extras.append(PlannedFile(info=entry.info, path=entry.path, data=read_member(
                archive, entry.info, limits=limits, cap=YAML_CAP)))
        elif "labels" in lowered and entry.parts[-1].lower() == "classes.txt":
            continue
        else:
            raise ArchiveRejected(
                f"{entry.info.filename}: unexpected file in a YOLO dataset (images belong under images/, "
                f"label .txt files under labels/, with data.yaml at the root)"
            )
    if not images:
        raise ArchiveRejected("YOLO dataset has no images under images/")

    class_counts = {name: 0 for name in names}
    segmentation = False
    boxes = 0
    annotations: list[PlannedFile] = []
    for label in sorted(labels, key=lambda entry: entry.path):
        if label.path not in images:
            expected = _image_path_hint(label.parts)
            raise ArchiveRejected(f"{label.info.filename}: no image for this label file (expected {expected})")
        data = read_member(archive, label.info, limits=limits, cap=LABEL_CAP)
        polygon_seen, counted = _check_label_lines(label.info.filename, data, names=names, class_counts=class_counts)
        segmentation = segmentation or polygon_seen
        boxes += counted
        annotations.append(PlannedFile(info=label.info, path=label.path, data=data))

    split_counts: dict[str, int] = {}
    for entry in images.values():
        split = _split_of(entry.parts)
        if split is not None:
            split_counts[split] = split_counts.get(split, 0) + 1
    task_types = ["object_detection"] + (["instance_segmentation"] if segmentation else [])
    return DatasetPlan(
        format="yolo",
        task_types=task_types,
        images=[PlannedFile(info=entry.info, path=entry.path) for entry in images.values()],
        class_names=list(names),
        class_counts=class_counts,
        splits=dict(sorted(split_counts.items())),
        annotations=annotations + extras,
        num_annotations=boxes,
    )


def _parse_data_yaml(name: str, data: bytes) -> list[str]:
    try:
        loaded: Any = yaml.safe_load(data.decode("utf-8"))
    except yaml.MarkedYAMLError as error:
        # One line for the user (the parser's own message spans several, with a caret drawing).
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ArchiveRejected(f"{name}: not valid YAML ({where}{error.problem or error.context or 'parse error'})") from error
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ArchiveRejected(f"{name}: not valid YAML ({error.__class__.__name__}: {error})") from error
    if not isinstance(loaded, dict):
        raise ArchiveRejected(f"{name}: must be a mapping with 'names' and 'nc'")
    raw = loaded.get("names")
    if isinstance(raw, list) and raw:
        names = [str(item) for item in raw]
    elif isinstance(raw, dict) and raw:
        try:
            indexed = {int(key): str(value) for key, value in raw.items()}
        except (TypeError, ValueError):
            raise ArchiveRejected(f"{name}: 'names' keys must be class indices 0..n-1") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise ArchiveRejected(
                f"{name}: 'names' indices must be 0..{len(indexed) - 1} without gaps, got {sorted(indexed)}"
            )
        names = [indexed[index] for index in range(len(indexed))]
    else:
        raise ArchiveRejected(f"{name}: 'names' is missing or empty (a list of class names, or index: name)")
    duplicates = sorted({item for item in names if names.count(item) > 1})
    if duplicates:
        raise ArchiveRejected(f"{name}: class name(s) listed twice in 'names': {', '.join(duplicates)}")
    nc = loaded.get("nc")
    if nc is not None and (not isinstance(nc, int) or nc != len(names)):
        raise ArchiveRejected(f"{name}: nc is {nc!r} but 'names' lists {len(names)} classes")
    return names


def _check_label_lines(
    name: str, data: bytes, *, names: list[str], class_counts: dict[str, int]
) -> tuple[bool, int]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveRejected(f"{name}: not a UTF-8 text label file") from None
    polygon = False
    counted = 0
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{name} line {number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise ArchiveRejected(
                f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)} fields"
            )
        try:
            index = int(fields[0])
            coords = [float(value) for value in fields[1:]]
        except ValueError:
            raise ArchiveRejected(f"{where}: class must be an integer and coordinates numbers: {line.strip()!r}") from None
        if not 0 <= index < len(names):
            raise ArchiveRejected(
                f"{where}: class {index} is not in data.yaml names (0..{len(names) - 1})"
            )
        if any(not -COORD_TOLERANCE <= value <= 1 + COORD_TOLERANCE for value in coords):
            raise ArchiveRejected(f"{where}: coordinates must be normalised to [0, 1]: {line.strip()!r}")
        if len(fields) == 5 and (coords[2] <= 0 or coords[3] <= 0):
            raise ArchiveRejected(f"{where}: box width and height must be positive: {line.strip()!r}")
        polygon = polygon or len(fields) > 5
        class_counts[names[index]] += 1
        counted += 1
    return polygon, counted


def _label_path_of(image_parts: list[str]) -> str:
    """`images/train/a.png` → `labels/train/a.txt` (the last `images` folder becomes `labels`)."""
    parts = list(image_parts)
    last = max(i for i, part in enumerate(parts[:-1]) if part.lower() == "images")
    parts[last] = "labels"
    parts[-1] = str(PurePosixPath(parts[-1]).with_suffix(".txt"))
    return "/".join(parts)


def _image_path_hint(label_parts: list[str]) -> str:
    parts = list(label_parts)
    last = max(i for i, part in enumerate(parts[:-1]) if part.lower() == "labels")
    parts[last] = "images"
    parts[-1] = str(PurePosixPath(parts[-1]).with_suffix(".*"))
    return "/".join(parts)


def _split_of(parts: list[str]) -> str | None:
    for part in parts[:-1]:
        if part.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[part.lower()]
    return None
