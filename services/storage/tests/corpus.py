"""Generated dataset corpus for the format tests: small good datasets in every format, and broken ones.

Everything is made here, in memory, from Pillow-drawn images: the suite downloads nothing.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

Entries = list[tuple[str, bytes]]


def png(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    """A small PNG whose colour depends on `seed`, so every image hashes differently."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def yolo_dataset(*, polygon: bool = False, names_as_dict: bool = False, wrapper: str = "") -> Entries:
    """YOLO: 3 train + 2 val images, 2 classes, one background image without a label file."""
    names: Any = {0: "cat", 1: "dog"} if names_as_dict else ["cat", "dog"]
    data_yaml = f"path: .\ntrain: images/train\nval: images/val\nnc: 2\nnames: {json.dumps(names)}\n"
    box = "0 0.5 0.5 0.25 0.25\n1 0.3 0.3 0.1 0.2\n"
    poly = "1 0.1 0.1 0.4 0.1 0.4 0.4\n"
    entries: Entries = [("data.yaml", data_yaml.encode())]
    for split, count in (("train", 3), ("val", 2)):
        for index in range(count):
            entries.append((f"images/{split}/{split}{index}.png", png(index + (10 if split == "val" else 0))))
            if split == "train" and index == 2:
                continue  # a background image: no label file
            entries.append((f"labels/{split}/{split}{index}.txt", (box + (poly if polygon else "")).encode()))
    return [(f"{wrapper}{name}", data) for name, data in entries]


def coco_document(file_names: list[str], *, segmentation: bool = False) -> dict[str, Any]:
    """A COCO instances document with one box per image, alternating two categories."""
    annotations = []
    for index, _ in enumerate(file_names):
        annotation: dict[str, Any] = {
            "id": index + 1, "image_id": index + 1, "category_id": 1 + index % 2, "bbox": [1, 1, 5, 4],
            "area": 20, "iscrowd": 0,
        }
        if segmentation:
            annotation["segmentation"] = [[1, 1, 6, 1, 6, 5]]
        annotations.append(annotation)
    return {
        "images": [{"id": i + 1, "file_name": name, "width": 16, "height": 12} for i, name in enumerate(file_names)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def coco_dataset(*, segmentation: bool = False) -> Entries:
    """COCO: annotations/instances_{train,val}.json with images under images/{train,val}/ (file_name bare)."""
    train = [f"t{i}.png" for i in range(3)]
    val = ["v0.png", "v1.png"]
    entries: Entries = [(f"images/train/{name}", png(i)) for i, name in enumerate(train)]
    entries += [(f"images/val/{name}", png(20 + i)) for i, name in enumerate(val)]
    train_doc = coco_document([f"train/{name}" for name in train], segmentation=segmentation)
    val_doc = coco_document([f"val/{name}" for name in val], segmentation=segmentation)
    entries.append(("annotations/instances_train.json", json.dumps(train_doc).encode()))
    entries.append(("annotations/instances_val.json", json.dumps(val_doc).encode()))
    return entries


def dice_dataset() -> Entries:
    """DICE: images/ plus annotations_classification.json and annotations_detection.json."""
    names = [f"img{i}.png" for i in range(4)]
    entries: Entries = [(f"images/{name}", png(40 + i)) for i, name in enumerate(names)]
    images = [{"id": i + 1, "file_name": name, "width": 16, "height": 12} for i, name in enumerate(names)]
    categories = [{"id": 0, "name": "ok"}, {"id": 1, "name": "defect"}]
    classification = {
        "format": "dice", "task_type": "classification", "images": images, "categories": categories,
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": i % 2} for i in range(4)],
    }
    detection = {
        "format": "dice", "task_type": "detection", "images": images, "categories": categories,
        "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [2, 2, 4, 4]}],
    }
    entries.append(("annotations_classification.json", json.dumps(classification).encode()))
    entries.append(("annotations_detection.json", json.dumps(detection).encode()))
    return entries
