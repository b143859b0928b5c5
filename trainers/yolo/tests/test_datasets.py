"""The staged-version → YOLO conversion: same labels from YOLO, COCO and DICE, splits honoured, bad input named."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from visionyard.cli.datasets_shapes import build_shapes_dataset
from visionyard.trainers.yolo.datasets import DatasetLayoutError, prepare_yolo_dataset


def _staged(tmp_path: Path, layout: str, *, segment: bool = False, num_images: int = 20) -> Path:
    summary = build_shapes_dataset(tmp_path / f"build-{layout}", num_images=num_images, image_size=64,
                                   layout=layout, segment=segment, seed=3)
    staged = tmp_path / f"staged-{layout}"
    with zipfile.ZipFile(summary.zip_path) as bundle:
        bundle.extractall(staged)
    return staged


def _labels(prepared_root: Path) -> dict[str, list[str]]:
    return {path.name: path.read_text().splitlines() for path in sorted(prepared_root.glob("labels/*/*.txt"))}


def test_yolo_and_coco_versions_give_the_same_yolo_labels_and_layout_splits(tmp_path: Path) -> None:
    from_yolo = prepare_yolo_dataset(_staged(tmp_path, "yolo"), tmp_path / "out-yolo")
    from_coco = prepare_yolo_dataset(_staged(tmp_path, "coco"), tmp_path / "out-coco")
    assert from_yolo.source_format == "yolo" and from_coco.source_format == "coco"
    assert from_yolo.class_names == from_coco.class_names == ["circle", "square", "triangle"]
    assert from_yolo.split_source == from_coco.split_source == "layout"
    assert from_yolo.counts == from_coco.counts == {"train": 13, "val": 3}
    yolo_labels, coco_labels = _labels(from_yolo.root), _labels(from_coco.root)
    assert yolo_labels.keys() == coco_labels.keys()
    for name, lines in yolo_labels.items():
        assert len(lines) == len(coco_labels[name]) >= 1
        for mine, theirs in zip(lines, coco_labels[name], strict=True):
            a, b = mine.split(), theirs.split()
            assert a[0] == b[0]
            assert all(abs(float(x) - float(y)) < 1e-4 for x, y in zip(a[1:], b[1:], strict=True))
    described = json.loads((from_coco.root / "data.yaml").read_text())
    assert described["names"] == {"0": "circle", "1": "square", "2": "triangle"}
    assert (from_coco.root / described["train"]).is_dir() and (from_coco.root / described["val"]).is_dir()


def test_dice_detection_file_with_background_category_and_job_split(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "coco")
    documents = [json.loads(path.read_text()) for path in sorted(staged.glob("instances_*.json"))]
    merged = {"images": [], "annotations": [], "categories": [{"id": 0, "name": "__background__"}]
              + documents[0]["categories"]}
    for document in documents:
        offset = len(merged["images"])
        merged["images"] += [{**image, "id": image["id"] + offset} for image in document["images"]]
        merged["annotations"] += [{**a, "image_id": a["image_id"] + offset, "id": len(merged["annotations"]) + i}
                                  for i, a in enumerate(document["annotations"])]
    for path in staged.glob("instances_*.json"):
        path.unlink()
    (staged / "annotations_detection.json").write_text(json.dumps(merged))
    images = sorted(image["file_name"] for image in merged["images"])
    split = {"train": images[:10], "val": images[10:14], "test": images[14:]}
    prepared = prepare_yolo_dataset(staged, tmp_path / "out", split=split)
    assert prepared.source_format == "dice"
    assert prepared.class_names == ["circle", "square", "triangle"]  # __background__ skipped
    assert prepared.split_source == "job"
    assert prepared.counts == {"train": 10, "val": 4, "test": len(images) - 14}
    assert sorted(prepared.files["val"]) == images[10:14]


def test_no_layout_split_is_cut_with_the_seed(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "yolo")
    for split in ("train", "val"):
        for folder in ("images", "labels"):
            for path in (staged / folder / split).iterdir():
                path.rename(staged / folder / path.name)
            (staged / folder / split).rmdir()
    first = prepare_yolo_dataset(staged, tmp_path / "a", val_fraction=0.25, seed=7)
    again = prepare_yolo_dataset(staged, tmp_path / "b", val_fraction=0.25, seed=7)
    assert first.split_source == "seeded" and first.counts == {"train": 12, "val": 4}
    assert sorted(first.files["val"]) == sorted(again.files["val"])


def test_segmentation_keeps_polygons_and_needs_them(tmp_path: Path) -> None:
    prepared = prepare_yolo_dataset(_staged(tmp_path, "coco", segment=True), tmp_path / "seg", task="segment")
    lines = [line for lines in _labels(prepared.root).values() for line in lines]
    assert lines and all(len(line.split()) > 5 for line in lines)
    with pytest.raises(DatasetLayoutError, match="no segment labels"):
        prepare_yolo_dataset(_staged(tmp_path, "yolo"), tmp_path / "boxes", task="segment")


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "yolo")
    with pytest.raises(DatasetLayoutError, match=r"split\.train: 'nope\.png' is not an image"):
        prepare_yolo_dataset(staged, tmp_path / "x", split={"train": ["nope.png"], "val": []})
    with pytest.raises(DatasetLayoutError, match="kpt_shape"):
        prepare_yolo_dataset(staged, tmp_path / "y", task="pose")
    empty = tmp_path / "empty"
    (empty / "stuff").mkdir(parents=True)
    (empty / "stuff" / "readme.md").write_text("hi")
    with pytest.raises(DatasetLayoutError, match="not a detection dataset"):
        prepare_yolo_dataset(empty, tmp_path / "z")


def test_imagefolder_for_cls_models_uses_class_folders_and_the_job_split(tmp_path: Path) -> None:
    from PIL import Image

    from visionyard.trainers.yolo.datasets import prepare_imagefolder

    staged = tmp_path / "staged" / "wrapper"
    for name in ("cat", "dog"):
        (staged / name).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(staged / name / f"{index}.png")
    seeded = prepare_imagefolder(tmp_path / "staged", tmp_path / "a", val_fraction=0.4, seed=1)
    assert seeded.class_names == ["cat", "dog"] and seeded.split_source == "seeded"
    assert seeded.counts == {"train": 6, "val": 4}
    assert {p.parent.name for p in (tmp_path / "a" / "val").rglob("*.png")} <= {"cat", "dog"}
    pinned = prepare_imagefolder(tmp_path / "staged", tmp_path / "b", split={
        "train": ["wrapper/cat/0.png", "wrapper/cat/1.png", "wrapper/dog/0.png"], "val": ["wrapper/dog/1.png"]})
    assert pinned.split_source == "job" and pinned.counts == {"train": 3, "val": 1}
    assert sorted(p.name for p in (tmp_path / "b" / "train" / "cat").iterdir()) == ["cat__0.png", "cat__1.png"]
