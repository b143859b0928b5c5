"""Turn a staged dataset version (YOLO, COCO, DICE or ImageFolder layout) into what Ultralytics trains on.

The runner stages a version exactly as storage normalized it (the upload's own layout). A YOLO-family
trainer calls `prepare_yolo_dataset` on it before training: images are linked (hard links, copies
across file systems) into `<out>/images/<split>/`, labels are written to `<out>/labels/<split>/`, and
`<out>/data.yaml` names the classes (plus `kpt_shape` for pose). No torch, no network.

Which images are train, val and test:
1. the job's pinned split (`TrainerJob.split`, image paths relative to the version), when it has one;
2. otherwise the layout's own split (`images/train/…`, `instances_val.json`);
3. otherwise a seeded shuffle cut at `val_fraction` (a layout with only a train split is cut the same way).

COCO/DICE categories become class indices in ascending category id; `__background__` is skipped.
Boxes `[x, y, w, h]` in pixels become normalised `cx cy w h`; polygon `segmentation`s become polygon
lines (segment task); `keypoints` become pose lines. An annotation the task cannot use is dropped
and counted in `PreparedYolo.skipped`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
DATA_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
TASKS = ("detect", "segment", "pose")


class DatasetLayoutError(ValueError):
    """The staged dataset cannot be read as the task needs (a user error, naming the file)."""


@dataclass
class _Item:
    """One image: where it is (relative to the version root), its split from the layout, its label lines."""

    relative: str
    split: str | None
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedYolo:
    """The YOLO dataset written for training."""

    data_yaml: Path
    root: Path
    source_format: str
    class_names: list[str]
    counts: dict[str, int]
    split_source: str  # "job", "layout" or "seeded"
    kpt_shape: list[int] | None = None
    skipped: int = 0
    # Relative image path (as in the version) → path of its link under `root`, per split.
    files: dict[str, dict[str, Path]] = field(default_factory=dict)


def _visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith((".", "__")))


def find_root(dataset_dir: Path) -> Path:
    """The version's root, looking through one wrapper folder (a zip of a folder)."""
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(f"dataset directory {dataset_dir} does not exist")
    entries = _visible(dataset_dir)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() not in ("images", "labels"):
        return entries[0]
    return dataset_dir


def detect_layout(root: Path) -> str:
    """`yolo` (a data.yaml), `dice` (annotations_<task>.json) or `coco` (any other instances JSON)."""
    if any((root / name).is_file() for name in DATA_YAML_NAMES):
        return "yolo"
    jsons = sorted(root.rglob("*.json"))
    if any(p.name.lower().startswith("annotations_") for p in jsons) or any(
        _json_format_field(p) == "dice" for p in jsons if p.name.lower() == "annotations.json"
    ):
        return "dice"
    if jsons:
        return "coco"
    raise DatasetLayoutError(
        f"{root}: not a detection dataset (no data.yaml, no COCO or DICE annotation JSON)"
    )


def _json_format_field(path: Path) -> str | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return str(loaded.get("format", "")).lower() if isinstance(loaded, dict) else None


def _split_of(parts: tuple[str, ...]) -> str | None:
    for part in parts[:-1]:
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None


# -- YOLO -------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml  # only the trainer environments need it; PyYAML ships with Ultralytics

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DatasetLayoutError(f"{path.name}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise DatasetLayoutError(f"{path.name}: must be a mapping with 'names'")
    return loaded


def _names_of(raw: Any, where: str) -> list[str]:
    if isinstance(raw, list) and raw:
        return [str(name) for name in raw]
    if isinstance(raw, dict) and raw:
        indexed = {int(key): str(value) for key, value in raw.items()}
        return [indexed[index] for index in sorted(indexed)]
    raise DatasetLayoutError(f"{where}: 'names' is missing or empty")


def _read_yolo(root: Path) -> tuple[list[str], list[_Item], list[int] | None, dict[str, Any]]:
    yaml_path = next(root / name for name in DATA_YAML_NAMES if (root / name).is_file())
    described = _load_yaml(yaml_path)
    names = _names_of(described.get("names"), yaml_path.name)
    kpt_shape = described.get("kpt_shape")
    extra = {key: described[key] for key in ("flip_idx",) if key in described}
    items: list[_Item] = []
    for image in sorted(root.rglob("*")):
        if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parts = image.relative_to(root).parts
        lowered = [part.lower() for part in parts[:-1]]
        if "images" not in lowered:
            continue
        # Ultralytics' rule: the last `images` folder becomes `labels`, the suffix `.txt`.
        last = len(lowered) - 1 - lowered[::-1].index("images")
        label_parts = list(parts)
        label_parts[last] = "labels"
        label = root.joinpath(*label_parts).with_suffix(".txt")
        lines = [line.strip() for line in label.read_text().splitlines() if line.strip()] if label.is_file() else []
        items.append(_Item(relative=image.relative_to(root).as_posix(), split=_split_of(parts), lines=lines))
    if not items:
        raise DatasetLayoutError(f"{root}: no images under images/")
    return names, items, list(kpt_shape) if kpt_shape else None, extra


# -- COCO / DICE --------------------------------------------------------------------------------------


def _annotation_files(root: Path, layout: str, task: str) -> list[Path]:
    jsons = sorted(root.rglob("*.json"))
    if layout == "dice":
        wanted = {"detect": "detection", "segment": "segmentation", "pose": "detection"}[task]
        named = [p for p in jsons if p.name.lower() == f"annotations_{wanted}.json"]
        if not named and task == "detect":
            named = [p for p in jsons if p.name.lower() == "annotations_segmentation.json"]
        if not named:
            named = [p for p in jsons if p.name.lower() == "annotations.json"]
        if not named:
            raise DatasetLayoutError(f"{root}: no DICE annotations_{wanted}.json for the {task} task")
        return named
    return jsons


def _resolve_image(root: Path, json_path: Path, file_name: str, image_root: str | None) -> Path | None:
    bases = [root, json_path.parent, root / "images", json_path.parent / "images"]
    if image_root:
        # The seed platform's `storage_info.image_root` is an S3 prefix (`datasets/<id>/images/`).
        bases[:0] = [root / image_root.strip("/"), root / PurePosixPath(image_root.strip("/")).name]
    for base in bases:
        candidate = base / file_name
        if candidate.is_file():
            return candidate
    return None


def _coco_split(path: Path) -> str | None:
    stem = path.stem.lower().replace("-", "_").replace(".", "_")
    for token in stem.split("_"):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def _read_coco(root: Path, layout: str, task: str) -> tuple[list[str], list[_Item], list[int] | None, int]:
    categories: dict[int, str] = {}
    per_image: dict[str, _Item] = {}
    raw_annotations: list[tuple[str, dict[str, Any], float, float]] = []
    kpt_count = 0
    for json_path in _annotation_files(root, layout, task):
        try:
            document = json.loads(json_path.read_text())
        except (OSError, ValueError) as error:
            raise DatasetLayoutError(f"{json_path.name}: not readable JSON ({error})") from error
        if not isinstance(document, dict) or "images" not in document:
            continue
        for category in document.get("categories") or []:
            if str(category.get("name")) == "__background__":
                continue
            categories[int(category["id"])] = str(category["name"])
            kpt_count = max(kpt_count, len(category.get("keypoints") or []))
        storage = document.get("storage_info") or {}
        split = _coco_split(json_path) if layout == "coco" else None
        by_id: dict[Any, tuple[str, float, float]] = {}
        for image in document["images"]:
            path = _resolve_image(root, json_path, str(image["file_name"]), storage.get("image_root"))
            if path is None:
                raise DatasetLayoutError(f"{json_path.name}: image {image['file_name']!r} is not in the dataset")
            relative = path.relative_to(root).as_posix()
            width = float(image.get("width") or 0)
            height = float(image.get("height") or 0)
            if width <= 0 or height <= 0:
                from PIL import Image

                with Image.open(path) as opened:
                    width, height = float(opened.width), float(opened.height)
            by_id[image["id"]] = (relative, width, height)
            per_image.setdefault(relative, _Item(relative=relative, split=split or _split_of(PurePosixPath(relative).parts)))
        for annotation in document.get("annotations") or []:
            if annotation.get("image_id") not in by_id:
                raise DatasetLayoutError(f"{json_path.name}: annotation for unknown image_id {annotation.get('image_id')!r}")
            relative, width, height = by_id[annotation["image_id"]]
            raw_annotations.append((relative, annotation, width, height))
    if not per_image:
        raise DatasetLayoutError(f"{root}: the annotation files list no images")
    ordered_ids = sorted(categories)
    index_of = {category_id: index for index, category_id in enumerate(ordered_ids)}
    skipped = 0
    for relative, annotation, width, height in raw_annotations:
        line = _coco_line(annotation, index_of, width, height, task=task, kpt_count=kpt_count)
        if line is None:
            skipped += 1
            continue
        per_image[relative].lines.append(line)
    names = [categories[category_id] for category_id in ordered_ids]
    kpt_shape = [kpt_count, 3] if task == "pose" and kpt_count else None
    return names, sorted(per_image.values(), key=lambda item: item.relative), kpt_shape, skipped


def _clip(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _coco_line(
    annotation: dict[str, Any], index_of: dict[int, int], width: float, height: float, *, task: str, kpt_count: int
) -> str | None:
    category = annotation.get("category_id")
    if category not in index_of or annotation.get("iscrowd"):
        return None
    cls = index_of[category]
    if task == "segment":
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, list) or not segmentation or not isinstance(segmentation[0], list):
            return None  # RLE masks and box-only annotations cannot train a polygon head
        polygon = max(segmentation, key=len)
        if len(polygon) < 6:
            return None
        coords = " ".join(f"{_clip(float(v) / (width if i % 2 == 0 else height)):.6f}" for i, v in enumerate(polygon))
        return f"{cls} {coords}"
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    box = f"{cls} {_clip((x + w / 2) / width):.6f} {_clip((y + h / 2) / height):.6f} {_clip(w / width):.6f} {_clip(h / height):.6f}"
    if task != "pose":
        return box
    keypoints = annotation.get("keypoints") or []
    if len(keypoints) != 3 * kpt_count:
        return None
    points = " ".join(
        f"{_clip(float(keypoints[i]) / width):.6f} {_clip(float(keypoints[i + 1]) / height):.6f} {float(keypoints[i + 2]):g}"
        for i in range(0, len(keypoints), 3)
    )
    return f"{box} {points}"


# -- writing -------------------------------------------------------------------------------------------


def _assign(items: list[_Item], *, job_split: dict[str, list[str]] | None, val_fraction: float, seed: int,
            root_prefix: str) -> tuple[dict[str, list[_Item]], str]:
    by_path = {item.relative: item for item in items}
    if job_split and job_split.get("train"):
        chosen: dict[str, list[_Item]] = {}
        for split, members in job_split.items():
            if split not in ("train", "val", "test"):
                continue
            for relative in members:
                key = relative[len(root_prefix):] if root_prefix and relative.startswith(root_prefix) else relative
                if key not in by_path:
                    raise DatasetLayoutError(f"split.{split}: {relative!r} is not an image of this dataset version")
                chosen.setdefault(split, []).append(by_path[key])
        return chosen, "job"
    layout: dict[str, list[_Item]] = {}
    for item in items:
        layout.setdefault(item.split or "train", []).append(item)
    if layout.get("train") and layout.get("val"):
        return layout, "layout"
    pool = sorted(layout.pop("train", []) + layout.pop("val", []), key=lambda item: item.relative)
    random.Random(seed).shuffle(pool)
    cut = max(1, round(len(pool) * val_fraction)) if len(pool) > 1 else 0
    return {**layout, "val": sorted(pool[:cut], key=lambda i: i.relative),
            "train": sorted(pool[cut:], key=lambda i: i.relative)}, "seeded"


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def prepare_yolo_dataset(
    dataset_dir: Path,
    out_dir: Path,
    *,
    task: str = "detect",
    split: dict[str, list[str]] | None = None,
    val_fraction: float = 0.2,
    seed: int = 42,
) -> PreparedYolo:
    """Write `out_dir/{images,labels}/<split>/…` and `out_dir/data.yaml` from a staged version."""
    if task not in TASKS:
        raise DatasetLayoutError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    dataset_dir = Path(dataset_dir)
    root = find_root(dataset_dir)
    root_prefix = root.relative_to(dataset_dir).as_posix() + "/" if root != dataset_dir else ""
    layout = detect_layout(root)
    extra: dict[str, Any] = {}
    skipped = 0
    if layout == "yolo":
        names, items, kpt_shape, extra = _read_yolo(root)
        if task == "segment":
            # A box line cannot train a mask head; Ultralytics would silently drop the masks instead.
            for item in items:
                kept = [line for line in item.lines if len(line.split()) > 5]
                skipped += len(item.lines) - len(kept)
                item.lines = kept
        if task == "pose" and not kpt_shape:
            raise DatasetLayoutError("data.yaml has no kpt_shape: the pose task needs keypoint labels")
    else:
        names, items, kpt_shape, skipped = _read_coco(root, layout, task)
        if task == "pose" and not kpt_shape:
            raise DatasetLayoutError("the annotation categories declare no keypoints: the pose task needs them")
    splits, source = _assign(items, job_split=split, val_fraction=val_fraction, seed=seed, root_prefix=root_prefix)
    if not splits.get("train"):
        raise DatasetLayoutError("the training split is empty")
    if not splits.get("val"):
        raise DatasetLayoutError("the validation split is empty (add val images or set a split with some)")
    if sum(len(item.lines) for item in splits["train"]) == 0:
        raise DatasetLayoutError(f"no {task} labels in the training split (skipped {skipped} unusable annotations)")

    shutil.rmtree(out_dir, ignore_errors=True)
    files: dict[str, dict[str, Path]] = {}
    for split_name, members in splits.items():
        image_dir = out_dir / "images" / split_name
        label_dir = out_dir / "labels" / split_name
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for item in members:
            # Flattened names keep `a/x.png` and `b/x.png` apart.
            flat = item.relative.replace("/", "__")
            target = image_dir / flat
            _link(root / item.relative, target)
            (label_dir / Path(flat).with_suffix(".txt").name).write_text("".join(line + "\n" for line in item.lines))
            files.setdefault(split_name, {})[item.relative] = target
    description: dict[str, Any] = {
        "path": str(out_dir.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(names)),
    }
    if splits.get("test"):
        description["test"] = "images/test"
    if kpt_shape:
        description["kpt_shape"] = kpt_shape
        description["flip_idx"] = extra.get("flip_idx") or list(range(kpt_shape[0]))
    data_yaml = out_dir / "data.yaml"
    # JSON is valid YAML: no YAML writer needed.
    data_yaml.write_text(json.dumps(description, indent=2))
    return PreparedYolo(
        data_yaml=data_yaml, root=out_dir, source_format=layout, class_names=names,
        counts={name: len(members) for name, members in sorted(splits.items())}, split_source=source,
        kpt_shape=kpt_shape, skipped=skipped, files=files,
    )


# -- ImageFolder (Ultralytics' -cls models) -------------------------------------------------------------


def prepare_imagefolder(
    dataset_dir: Path,
    out_dir: Path,
    *,
    split: dict[str, list[str]] | None = None,
    val_fraction: float = 0.2,
    seed: int = 42,
) -> PreparedYolo:
    """Write `out_dir/{train,val[,test]}/<class>/<image>` links from a staged ImageFolder version.

    The class of an image is its folder; the split is the job's, else `train/` and `val/` folders, else
    a seeded cut. `data_yaml` of the result is `out_dir` itself (Ultralytics classifies a directory).
    """
    dataset_dir = Path(dataset_dir)
    root = find_root(dataset_dir)
    root_prefix = root.relative_to(dataset_dir).as_posix() + "/" if root != dataset_dir else ""
    items: list[_Item] = []
    for image in sorted(root.rglob("*")):
        if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
            continue
        parts = image.relative_to(root).parts
        if len(parts) < 2:
            raise DatasetLayoutError(f"{image.name}: not in a class folder (<class>/<image>)")
        items.append(_Item(relative=image.relative_to(root).as_posix(), split=_split_of(parts) if len(parts) > 2 else None,
                           lines=[parts[-2]]))
    if not items:
        raise DatasetLayoutError(f"{root}: no images in class folders")
    splits, source = _assign(items, job_split=split, val_fraction=val_fraction, seed=seed, root_prefix=root_prefix)
    if not splits.get("train") or not splits.get("val"):
        raise DatasetLayoutError("the training and validation splits both need images")
    class_names = sorted({item.lines[0] for item in splits["train"]})
    if len(class_names) < 2:
        raise DatasetLayoutError(f"need at least 2 classes in the training split, found {class_names}")
    shutil.rmtree(out_dir, ignore_errors=True)
    files: dict[str, dict[str, Path]] = {}
    for split_name, members in splits.items():
        for item in members:
            target = out_dir / split_name / item.lines[0] / item.relative.replace("/", "__")
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(root / item.relative, target)
            files.setdefault(split_name, {})[item.relative] = target
    return PreparedYolo(
        data_yaml=out_dir, root=out_dir, source_format="imagefolder", class_names=class_names,
        counts={name: len(members) for name, members in sorted(splits.items())}, split_source=source, files=files,
    )
