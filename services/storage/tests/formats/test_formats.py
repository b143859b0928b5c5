"""Format detection and checks: a good dataset in every format is accepted with its statistics, and a
broken one is refused with a reason that names the file and the entry or line."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from visionyard.storage.archive import ArchiveLimits, ArchiveRejected, InspectedDataset
from visionyard.storage.formats import inspect_dataset_archive

from ..corpus import coco_dataset, coco_document, dice_dataset, png, yolo_dataset

LIMITS = ArchiveLimits(max_upload_bytes=50 * 1024**2, max_uncompressed_bytes=64 * 1024**2, max_files=200)


def inspect(path: Path, tmp_path: Path) -> InspectedDataset:
    return inspect_dataset_archive(path, workdir=tmp_path / f"work-{path.stem}", limits=LIMITS)


def rejection(path: Path, tmp_path: Path) -> str:
    with pytest.raises(ArchiveRejected) as caught:
        inspect(path, tmp_path)
    return caught.value.reason


def replace(entries: list[tuple[str, bytes]], name: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(n, data if n == name else d) for n, d in entries]


def test_imagefolder_still_detected(make_zip: Callable[..., Path], flat_dataset, tmp_path: Path) -> None:
    dataset = inspect(make_zip(flat_dataset), tmp_path)
    assert dataset.format == "imagefolder" and dataset.task_types == ["image_classification"]
    assert dataset.class_counts == {"cats": 3, "dogs": 2}
    assert [name for name, _ in dataset.image_files] == sorted(name for name, _ in flat_dataset)


@pytest.mark.parametrize("names_as_dict", [False, True])
def test_yolo_is_accepted_with_stats_and_keeps_its_layout(make_zip, tmp_path: Path, names_as_dict: bool) -> None:
    entries = yolo_dataset(names_as_dict=names_as_dict, wrapper="mydata/")
    dataset = inspect(make_zip(entries), tmp_path)
    assert dataset.format == "yolo"
    assert dataset.task_types == ["object_detection"]
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.class_counts == {"cat": 4, "dog": 4}  # 4 labelled images × one box of each class
    assert dataset.splits == {"train": 3, "val": 2}
    assert dataset.num_images == 5 and dataset.num_annotations == 8
    with zipfile.ZipFile(dataset.archive) as normalized:
        names = normalized.namelist()
    assert "data.yaml" in names and "labels/val/val1.txt" in names and "images/train/train2.png" in names


def test_yolo_polygons_add_segmentation(make_zip, tmp_path: Path) -> None:
    dataset = inspect(make_zip(yolo_dataset(polygon=True)), tmp_path)
    assert dataset.task_types == ["object_detection", "instance_segmentation"]


def test_coco_is_accepted_with_splits_from_file_names(make_zip, tmp_path: Path) -> None:
    dataset = inspect(make_zip(coco_dataset()), tmp_path)
    assert dataset.format == "coco" and dataset.task_types == ["object_detection"]
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.class_counts == {"cat": 3, "dog": 2}
    assert dataset.splits == {"train": 3, "val": 2}
    assert dataset.num_images == 5 and dataset.num_annotations == 5
    with zipfile.ZipFile(dataset.archive) as normalized:
        assert "annotations/instances_train.json" in normalized.namelist()


def test_coco_segmentation_is_reported(make_zip, tmp_path: Path) -> None:
    dataset = inspect(make_zip(coco_dataset(segmentation=True)), tmp_path)
    assert dataset.task_types == ["object_detection", "instance_segmentation"]


def test_dice_serves_every_task_it_has_a_file_for(make_zip, tmp_path: Path) -> None:
    dataset = inspect(make_zip(dice_dataset()), tmp_path)
    assert dataset.format == "dice"
    assert dataset.task_types == ["image_classification", "object_detection"]
    assert dataset.class_names == ["ok", "defect"]
    assert dataset.class_counts == {"ok": 2, "defect": 3}
    assert dataset.num_images == 4


def test_same_content_gives_the_same_hash_and_a_label_change_a_new_one(make_zip, tmp_path: Path) -> None:
    first = inspect(make_zip(yolo_dataset()), tmp_path)
    again = inspect(make_zip(list(reversed(yolo_dataset()))), tmp_path)
    changed = inspect(make_zip(replace(yolo_dataset(), "labels/val/val0.txt", b"1 0.5 0.5 0.2 0.2\n")), tmp_path)
    assert first.content_hash == again.content_hash
    assert changed.content_hash != first.content_hash


# -- broken datasets: each names the file and what is wrong ---------------------------------------


def test_yolo_label_with_unknown_class_names_file_and_line(make_zip, tmp_path: Path) -> None:
    entries = replace(yolo_dataset(), "labels/train/train1.txt", b"0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    assert rejection(make_zip(entries), tmp_path) == (
        "labels/train/train1.txt line 2: class 7 is not in data.yaml names (0..1)"
    )


def test_yolo_label_without_image(make_zip, tmp_path: Path) -> None:
    entries = yolo_dataset() + [("labels/train/ghost.txt", b"0 0.5 0.5 0.2 0.2\n")]
    assert rejection(make_zip(entries), tmp_path) == (
        "labels/train/ghost.txt: no image for this label file (expected images/train/ghost.*)"
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"0 0.5 0.5 0.2\n", "line 1: expected 'class cx cy w h'"),
        (b"0 0.5 0.5 1.7 0.2\n", "line 1: coordinates must be normalised to [0, 1]"),
        (b"cat 0.5 0.5 0.2 0.2\n", "line 1: class must be an integer"),
    ],
)
def test_yolo_malformed_label_lines(make_zip, tmp_path: Path, line: bytes, expected: str) -> None:
    reason = rejection(make_zip(replace(yolo_dataset(), "labels/val/val0.txt", line)), tmp_path)
    assert reason.startswith("labels/val/val0.txt " + expected)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (b"nc: 3\nnames: [cat, dog]\n", "data.yaml: nc is 3 but 'names' lists 2 classes"),
        (b"nc: 2\n", "data.yaml: 'names' is missing or empty"),
        (b"names: [cat, cat]\n", "data.yaml: class name(s) listed twice in 'names': cat"),
        (b"names: [cat\n", "data.yaml: not valid YAML"),
    ],
)
def test_yolo_bad_data_yaml(make_zip, tmp_path: Path, yaml_text: bytes, expected: str) -> None:
    assert rejection(make_zip(replace(yolo_dataset(), "data.yaml", yaml_text)), tmp_path).startswith(expected)


def test_yolo_without_data_yaml(make_zip, tmp_path: Path) -> None:
    entries = [(name, data) for name, data in yolo_dataset() if name != "data.yaml"]
    assert rejection(make_zip(entries), tmp_path).startswith("data.yaml is missing")


def test_coco_annotation_pointing_at_missing_image_or_unknown_category(make_zip, tmp_path: Path) -> None:
    document = coco_document(["train/t0.png", "train/t1.png", "train/t2.png"])
    document["annotations"][1]["image_id"] = 99
    entries = replace(coco_dataset(), "annotations/instances_train.json", json.dumps(document).encode())
    assert rejection(make_zip(entries), tmp_path) == (
        "annotations/instances_train.json: annotations[1] (id 2): image_id 99 is not in this file's images"
    )
    document = coco_document(["train/t0.png", "train/t1.png", "train/t2.png"])
    document["annotations"][2]["category_id"] = 5
    entries = replace(coco_dataset(), "annotations/instances_train.json", json.dumps(document).encode())
    assert rejection(make_zip(entries), tmp_path) == (
        "annotations/instances_train.json: annotations[2] (id 3): category_id 5 is not a declared category"
    )


def test_coco_file_name_missing_from_archive(make_zip, tmp_path: Path) -> None:
    document = coco_document(["train/t0.png", "train/t1.png", "train/nope.png"])
    entries = replace(coco_dataset(), "annotations/instances_train.json", json.dumps(document).encode())
    assert rejection(make_zip(entries), tmp_path) == (
        "annotations/instances_train.json: images[2] (id 3): file_name 'train/nope.png' is not in the archive"
    )


def test_coco_image_not_listed_and_bad_bbox_and_not_instances(make_zip, tmp_path: Path) -> None:
    entries = coco_dataset() + [("images/train/stray.png", png(99))]
    assert rejection(make_zip(entries), tmp_path).startswith(
        "images/train/stray.png: image is not listed in any annotation file"
    )
    document = coco_document(["train/t0.png", "train/t1.png", "train/t2.png"])
    document["annotations"][0]["bbox"] = [1, 1, -5, 4]
    entries = replace(coco_dataset(), "annotations/instances_train.json", json.dumps(document).encode())
    assert "annotations[0] (id 1): bbox [1, 1, -5, 4] needs" in rejection(make_zip(entries), tmp_path)
    entries = replace(coco_dataset(), "annotations/instances_val.json", b'{"info": {}}')
    assert rejection(make_zip(entries), tmp_path) == (
        "annotations/instances_val.json: not a COCO instances file (missing or not a list: images, annotations, categories)"
    )
    entries = replace(coco_dataset(), "annotations/instances_val.json", b"{not json")
    assert rejection(make_zip(entries), tmp_path).startswith("annotations/instances_val.json: not valid JSON")


def test_dice_classification_label_twice_and_unknown_category(make_zip, tmp_path: Path) -> None:
    entries = dice_dataset()
    document = json.loads(dict(entries)["annotations_classification.json"])
    document["annotations"].append({"id": 9, "image_id": 1, "category_id": 1})
    reason = rejection(make_zip(replace(entries, "annotations_classification.json", json.dumps(document).encode())), tmp_path)
    assert reason == "annotations_classification.json: annotations[4] (id 9): image_id 1 already has a class label"
    document = json.loads(dict(entries)["annotations_detection.json"])
    document["annotations"][0]["category_id"] = 3
    reason = rejection(make_zip(replace(entries, "annotations_detection.json", json.dumps(document).encode())), tmp_path)
    assert reason == "annotations_detection.json: annotations[0] (id 1): category_id 3 is not a declared category"


def test_file_that_claims_to_be_an_image_in_yolo(make_zip, tmp_path: Path) -> None:
    entries = replace(yolo_dataset(), "images/val/val1.png", b"\x89PNG\r\n\x1a\n not really")
    assert rejection(make_zip(entries), tmp_path).startswith("images/val/val1.png: not a readable image")


def test_unknown_layout_names_the_file(make_zip, tmp_path: Path) -> None:
    entries = yolo_dataset() + [("notes/readme.pdf", b"%PDF")]
    assert rejection(make_zip(entries), tmp_path).startswith("notes/readme.pdf: unexpected file in a YOLO dataset")
