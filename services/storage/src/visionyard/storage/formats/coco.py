"""COCO and DICE JSON datasets: annotation files naming images that the archive holds.

**COCO**: one or more instances files, each `{"images": [{id, file_name, ...}], "annotations":
[{id, image_id, category_id, bbox: [x, y, w, h], segmentation?}], "categories": [{id, name}]}`. The
split comes from the file name (`instances_train.json` → train). Serves object_detection, plus
instance_segmentation when any annotation carries a polygon or RLE `segmentation`.

**DICE** (the seed platform's format): the same COCO-like shape, one file per task, named
`annotations_<task>.json` with task `classification`, `detection` or `segmentation` (an optional
`annotations.json` with `"format": "dice"` and `"task_type"` works too). A classification file's
annotations need only `image_id` and `category_id` (one label per image); a detection file's
need `bbox`; a segmentation file's need `segmentation`. Every task file uses the same image ids
and category names. It serves the tasks it has files for.

For both, an image's `file_name` is resolved against the archive root, the JSON's folder and an
`images/` folder beside either; an image named by no annotation file, an annotation pointing at an
unknown image or category, and a `file_name` the archive lacks are all rejected, naming the file
and the entry.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

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

JSON_CAP = 512 * 1024 * 1024
_DICE_NAME = re.compile(r"^annotations_(classification|detection|segmentation)\.json$", re.IGNORECASE)
DICE_TASKS = {
    "classification": "image_classification",
    "detection": "object_detection",
    "segmentation": "instance_segmentation",
}
_SPLIT_TOKEN = re.compile(r"(?:^|[_\-.])(train|val|valid|test)(?:[_\-.]|$)", re.IGNORECASE)


def dice_task_of(file_name: str) -> str | None:
    """The task of a DICE annotation file, from its name (`annotations_detection.json` → detection)."""
    match = _DICE_NAME.match(file_name)
    return match.group(1).lower() if match else None


@dataclass
class _Collected:
    category_names: dict[int, str] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    referenced: dict[str, str | None] = field(default_factory=dict)  # image path → split
    task_types: set[str] = field(default_factory=set)
    annotations: int = 0


def plan_coco(
    archive: zipfile.ZipFile, files: list[Entry], *, limits: ArchiveLimits, dice: bool
) -> DatasetPlan:
    """Check every annotation file against the archive's images and count annotations per class."""
    images = {entry.path: entry for entry in files if PurePosixPath(entry.path).suffix.lower() in IMAGE_EXTENSIONS}
    jsons: list[Entry] = []
    for entry in files:
        if entry.path in images:
            continue
        if PurePosixPath(entry.path).suffix.lower() == ".json":
            jsons.append(entry)
            continue
        kind = "DICE" if dice else "COCO"
        raise ArchiveRejected(
            f"{entry.info.filename}: unexpected file in a {kind} dataset (only images and annotation JSON files)"
        )
    if not images:
        raise ArchiveRejected("the dataset holds annotation files but no images")
    folded = {path.casefold(): path for path in images}
    collected = _Collected()
    kept: list[PlannedFile] = []
    for entry in sorted(jsons, key=lambda item: item.path):
        data = read_member(archive, entry.info, limits=limits, cap=JSON_CAP)
        document = _load_json(entry.info.filename, data)
        task = _task_of(entry, document, dice=dice)
        _check_document(entry, document, task=task, folded=folded, collected=collected)
        kept.append(PlannedFile(info=entry.info, path=entry.path, data=data))

    for path in sorted(images):
        if path not in collected.referenced:
            names = ", ".join(entry.path for entry in jsons)
            raise ArchiveRejected(f"{path}: image is not listed in any annotation file ({names})")
    split_counts: dict[str, int] = {}
    for split in collected.referenced.values():
        if split is not None:
            split_counts[split] = split_counts.get(split, 0) + 1
    class_names = [collected.category_names[key] for key in sorted(collected.category_names)]
    order = ["image_classification", "object_detection", "instance_segmentation"]
    return DatasetPlan(
        format="dice" if dice else "coco",
        task_types=[task for task in order if task in collected.task_types],
        images=[PlannedFile(info=images[path].info, path=path) for path in sorted(images)],
        class_names=class_names,
        class_counts={name: collected.class_counts.get(name, 0) for name in class_names},
        splits=dict(sorted(split_counts.items())),
        annotations=kept,
        num_annotations=collected.annotations,
    )


def _load_json(name: str, data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise ArchiveRejected(f"{name}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise ArchiveRejected(f"{name}: must be a JSON object with images, annotations and categories")
    return document


def _task_of(entry: Entry, document: dict[str, Any], *, dice: bool) -> str:
    name = entry.info.filename
    if not dice:
        missing = [key for key in ("images", "annotations", "categories") if not isinstance(document.get(key), list)]
        if missing:
            raise ArchiveRejected(
                f"{name}: not a COCO instances file (missing or not a list: {', '.join(missing)})"
            )
        return "detection"
    task = dice_task_of(entry.parts[-1]) or str(document.get("task_type", "")).lower()
    task = {"image_classification": "classification", "object_detection": "detection",
            "instance_segmentation": "segmentation"}.get(task, task)
    if task not in DICE_TASKS:
        raise ArchiveRejected(
            f"{name}: not a DICE annotation file (name it annotations_classification.json, "
            "annotations_detection.json or annotations_segmentation.json)"
        )
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(document.get(key), list)]
    if missing:
        raise ArchiveRejected(f"{name}: DICE {task} file lacks a list of {', '.join(missing)}")
    return task


def _check_document(
    entry: Entry, document: dict[str, Any], *, task: str, folded: dict[str, str], collected: _Collected
) -> None:
    name = entry.info.filename
    split_match = _SPLIT_TOKEN.search(PurePosixPath(entry.path).stem)
    split = SPLIT_NAMES[split_match.group(1).lower()] if split_match else None

    categories: dict[int, str] = {}
    for index, category in enumerate(document["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or not category.get("name"):
            raise ArchiveRejected(f"{name}: categories[{index}] needs an integer 'id' and a 'name'")
        if category["id"] in categories:
            raise ArchiveRejected(f"{name}: categories[{index}]: category id {category['id']} is declared twice")
        known = collected.category_names.get(category["id"])
        if known is not None and known != str(category["name"]):
            raise ArchiveRejected(
                f"{name}: categories[{index}]: id {category['id']} is {category['name']!r} here but {known!r} "
                "in another annotation file"
            )
        categories[category["id"]] = str(category["name"])
    if not categories:
        raise ArchiveRejected(f"{name}: 'categories' is empty")
    collected.category_names.update(categories)

    image_ids: dict[Any, str] = {}
    prefixes = _prefixes(entry.parts[:-1])
    for index, image in enumerate(document["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ArchiveRejected(f"{name}: images[{index}] needs an 'id' and a 'file_name'")
        if image["id"] in image_ids:
            raise ArchiveRejected(f"{name}: images[{index}]: image id {image['id']} is listed twice")
        path = _resolve(image["file_name"], prefixes, folded)
        if path is None:
            raise ArchiveRejected(
                f"{name}: images[{index}] (id {image['id']}): file_name {image['file_name']!r} is not in the archive"
            )
        image_ids[image["id"]] = path
        collected.referenced.setdefault(path, split)

    labelled: set[Any] = set()
    for index, annotation in enumerate(document["annotations"]):
        where = f"{name}: annotations[{index}]" + (
            f" (id {annotation['id']})" if isinstance(annotation, dict) and "id" in annotation else ""
        )
        if not isinstance(annotation, dict):
            raise ArchiveRejected(f"{where}: must be an object")
        if annotation.get("image_id") not in image_ids:
            raise ArchiveRejected(f"{where}: image_id {annotation.get('image_id')!r} is not in this file's images")
        if annotation.get("category_id") not in categories:
            raise ArchiveRejected(
                f"{where}: category_id {annotation.get('category_id')!r} is not a declared category"
            )
        segmentation = annotation.get("segmentation")
        if task == "classification":
            if annotation["image_id"] in labelled:
                raise ArchiveRejected(f"{where}: image_id {annotation['image_id']} already has a class label")
            labelled.add(annotation["image_id"])
            collected.task_types.add(DICE_TASKS["classification"])
        elif task == "segmentation" and not segmentation:
            raise ArchiveRejected(f"{where}: a segmentation annotation needs 'segmentation' (polygons or RLE)")
        if "bbox" in annotation or task == "detection":
            _check_bbox(where, annotation.get("bbox"))
        if task in ("detection", "segmentation"):
            collected.task_types.add(DICE_TASKS["detection"])
        if segmentation:
            if not isinstance(segmentation, (list, dict)):
                raise ArchiveRejected(f"{where}: 'segmentation' must be polygons (a list) or RLE (an object)")
            collected.task_types.add(DICE_TASKS["segmentation"])
        class_name = categories[annotation["category_id"]]
        collected.class_counts[class_name] = collected.class_counts.get(class_name, 0) + 1
        collected.annotations += 1
    if task == "classification" and not document["annotations"]:
        raise ArchiveRejected(f"{name}: a classification file needs one annotation per labelled image")
    if task == "detection" and not collected.task_types:
        # A detection file with no boxes yet (every image a background) still declares the task.
        collected.task_types.add(DICE_TASKS["detection"])


def _check_bbox(where: str, bbox: Any) -> None:
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in bbox)
    ):
        raise ArchiveRejected(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
    if bbox[2] <= 0 or bbox[3] <= 0 or bbox[0] < 0 or bbox[1] < 0:
        raise ArchiveRejected(f"{where}: bbox {bbox!r} needs x, y >= 0 and a positive width and height")


def _prefixes(json_dir: list[str]) -> list[str]:
    """Folders a `file_name` may be relative to, most specific first."""
    candidates = []
    if json_dir:
        base = "/".join(json_dir)
        candidates += [base, f"{base}/images"]
        if len(json_dir) > 1:
            parent = "/".join(json_dir[:-1])
            candidates += [parent, f"{parent}/images"]
    candidates += ["", "images"]
    return candidates


def _resolve(file_name: str, prefixes: list[str], folded: dict[str, str]) -> str | None:
    relative = file_name.replace("\\", "/").lstrip("./")
    if ".." in relative.split("/"):
        return None
    for prefix in prefixes:
        candidate = f"{prefix}/{relative}" if prefix else relative
        found = folded.get(candidate.casefold())
        if found is not None:
            return found
    return None
