"""The classifier trains on exactly the split the job file names, overriding folders and val_split."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from visionyard.trainers.classifier.data import load_imagefolder


def test_configured_split_decides_train_and_val(tmp_path: Path) -> None:
    for label, colour in (("cats", (250, 0, 0)), ("dogs", (0, 0, 250))):
        (tmp_path / label).mkdir()
        for index in range(4):
            Image.new("RGB", (8, 8), colour).save(tmp_path / label / f"{index}.png")
    split = {
        "train": ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png"],
        "val": ["cats/3.png", "dogs/2.png", "dogs/3.png"],
    }
    loaded = load_imagefolder(tmp_path, image_size=8, val_split=0.5, seed=0, split=split)
    assert loaded.class_names == ["cats", "dogs"]
    assert len(loaded.train.labels) == 5 and len(loaded.val.labels) == 3
    assert sorted(loaded.val.labels.tolist()) == [0, 1, 1]
    without = load_imagefolder(tmp_path, image_size=8, val_split=0.5, seed=0)
    assert len(without.val.labels) == 4  # no split configured: val_split decides
