"""The digits ImageFolder builder: structure, decodable PNGs, counts, held-out split, determinism."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image

from visionyard.cli.datasets_digits import build_digits_imagefolder

DIGITS_TOTAL = 1797  # images in scikit-learn's bundled digits


def test_zip_is_an_imagefolder_of_decodable_pngs_with_a_heldout_split(tmp_path: Path) -> None:
    summary = build_digits_imagefolder(tmp_path / "digits.zip", tmp_path / "heldout")

    with zipfile.ZipFile(summary.zip_path) as archive:
        names = archive.namelist()
        splits = {name.split("/")[0] for name in names}
        classes = {split: sorted({name.split("/")[1] for name in names if name.startswith(f"{split}/")})
                   for split in ("train", "val")}
        sample = Image.open(io.BytesIO(archive.read(names[0])))
        sample.load()
        pixel_range = sample.getextrema()

    assert splits == {"train", "val"}
    assert classes["train"] == classes["val"] == [str(digit) for digit in range(10)]
    assert all(name.endswith(".png") for name in names)
    assert sample.size == (8, 8) and sample.mode == "L"
    assert pixel_range[1] > 16  # scaled to 0..255, not the raw 0..16
    assert len(names) == summary.split_counts["train"] + summary.split_counts["val"]

    heldout = sorted(p for p in (tmp_path / "heldout").rglob("*.png"))
    assert len(heldout) == summary.split_counts["test"]
    assert sum(summary.split_counts.values()) == DIGITS_TOTAL
    # ~10% held out, the rest split 80/20
    assert 170 <= summary.split_counts["test"] <= 190
    assert abs(summary.split_counts["val"] / (DIGITS_TOTAL - summary.split_counts["test"]) - 0.2) < 0.01
    zipped_files = {Path(name).name for name in names}
    assert not zipped_files & {p.name for p in heldout}  # no held-out image leaks into training data
    # stratified: every class appears in every split
    assert all(min(counts.values()) > 0 for counts in summary.class_counts.values())
    assert (tmp_path / "heldout" / "labels.csv").read_text().count("\n") == summary.split_counts["test"] + 1


def test_same_seed_gives_identical_bytes_and_another_seed_a_different_split(tmp_path: Path) -> None:
    first = build_digits_imagefolder(tmp_path / "a.zip", tmp_path / "ha", seed=0)
    again = build_digits_imagefolder(tmp_path / "b.zip", tmp_path / "hb", seed=0)
    other = build_digits_imagefolder(tmp_path / "c.zip", tmp_path / "hc", seed=1)

    assert first.sha256 == again.sha256
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert other.sha256 != first.sha256
