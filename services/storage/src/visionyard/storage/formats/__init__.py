"""Dataset format detection: which layout an upload uses, then that format's checks and statistics.

Recognised layouts (after dropping one wrapper folder):

- **ImageFolder** — `<class>/<image>` or `<split>/<class>/<image>`; serves image_classification.
- **YOLO** — `data.yaml` (`names` list or dict, `nc`), `images/[<split>/]…`, `labels/[<split>/]…/*.txt`
  with one `class cx cy w h` (normalised) or `class x1 y1 x2 y2 …` (polygon) per line; serves
  object_detection, plus instance_segmentation when polygons appear.
- **COCO** — one or more instances JSON files (`images`, `annotations`, `categories`) and the images
  they name; the split comes from the file name (`instances_train.json`).
- **DICE** — the seed platform's COCO-like layout with one annotation file per task
  (`annotations_classification.json`, `annotations_detection.json`, `annotations_segmentation.json`);
  see `formats.coco`.

Anything else is rejected with a reason naming the file and what is wrong.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from visionyard.storage.archive import (
    ArchiveLimits,
    ArchiveRejected,
    DatasetPlan,
    Entry,
    InspectedDataset,
    check_upload_file,
    files_of,
    plan_imagefolder,
    safe_entries,
    write_normalized,
)
from visionyard.storage.formats import coco, yolo

FORMATS = ("imagefolder", "yolo", "coco", "dice")


def inspect_dataset_archive(
    source: Path, *, workdir: Path, limits: ArchiveLimits, label: str | None = None
) -> InspectedDataset:
    """Check an uploaded zip in any supported format and write its normalized archive under `workdir`.

    Raises `ArchiveRejected` with a reason naming the offending file and the problem.
    """
    label = label or source.name
    check_upload_file(source, limits=limits, label=label)
    try:
        with zipfile.ZipFile(source) as archive:
            plan = plan_dataset(archive, safe_entries(archive, limits), limits=limits)
            return write_normalized(archive, plan, workdir=workdir, limits=limits)
    except zipfile.BadZipFile as error:
        raise ArchiveRejected(f"{label} is not a readable zip archive: {error}") from error


def detect_format(entries: list[Entry]) -> str:
    """The format the layout declares: its marker files decide, ImageFolder otherwise."""
    files = files_of(entries)
    if any(yolo.is_data_yaml(entry) for entry in files) or any(
        entry.parts[0].lower() == "labels" and entry.path.lower().endswith(".txt") for entry in files
    ):
        return "yolo"
    jsons = [entry for entry in files if PurePosixPath(entry.path).suffix.lower() == ".json"]
    if any(coco.dice_task_of(entry.parts[-1]) for entry in jsons):
        return "dice"
    if jsons:
        return "coco"
    return "imagefolder"


def plan_dataset(archive: zipfile.ZipFile, entries: list[Entry], *, limits: ArchiveLimits) -> DatasetPlan:
    """Detect the format and run its checks."""
    chosen = detect_format(entries)
    if chosen == "yolo":
        return yolo.plan_yolo(archive, files_of(entries), limits=limits)
    if chosen in ("coco", "dice"):
        return coco.plan_coco(archive, files_of(entries), limits=limits, dice=chosen == "dice")
    return plan_imagefolder(entries)


__all__ = ["FORMATS", "detect_format", "inspect_dataset_archive", "plan_dataset"]
