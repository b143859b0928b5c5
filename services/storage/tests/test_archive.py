"""The ImageFolder archive check: good layouts are accepted with their stats, attacks are refused."""

from __future__ import annotations

import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from visionyard.storage.archive import ArchiveLimits, ArchiveRejected, InspectedDataset
from visionyard.storage.formats import inspect_dataset_archive

LIMITS = ArchiveLimits(max_upload_bytes=50 * 1024**2, max_uncompressed_bytes=64 * 1024**2, max_files=100)


def inspect(path: Path, tmp_path: Path, limits: ArchiveLimits = LIMITS) -> InspectedDataset:
    # Through the upload check storage runs (format detection first): these layouts are ImageFolder.
    return inspect_dataset_archive(path, workdir=tmp_path / f"work-{path.stem}", limits=limits)


def rejection(path: Path, tmp_path: Path, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(ArchiveRejected) as caught:
        inspect(path, tmp_path, limits)
    return caught.value.reason


def test_flat_imagefolder_is_accepted_with_stats(make_zip: Callable[..., Path], flat_dataset, tmp_path: Path) -> None:
    dataset = inspect(make_zip(flat_dataset + [(".DS_Store", b"junk"), ("__MACOSX/cats/._a.png", b"junk")]), tmp_path)
    assert dataset.class_names == ["cats", "dogs"]
    assert dataset.class_counts == {"cats": 3, "dogs": 2}
    assert dataset.num_images == 5
    assert dataset.splits == {}
    assert dataset.manifest()["num_classes"] == 2
    assert dataset.format == "imagefolder" and dataset.task_types == ["image_classification"]
    with zipfile.ZipFile(dataset.archive) as normalized:
        assert normalized.namelist() == sorted(name for name, _ in flat_dataset)
    assert dataset.size_bytes == dataset.archive.stat().st_size


def test_split_layout_under_a_wrapper_folder_is_normalized(make_zip, images, tmp_path: Path) -> None:
    png = images["png"]
    entries = [
        ("mydata/", b""),
        ("mydata/train/cats/1.png", png((1, 2, 3))),
        ("mydata/train/cats/2.png", png((4, 5, 6))),
        ("mydata/train/dogs/1.png", png((7, 8, 9))),
        ("mydata/valid/cats/3.png", png((10, 11, 12))),
        ("mydata/valid/dogs/2.png", png((13, 14, 15))),
        ("mydata/test/dogs/3.png", png((16, 17, 18))),
    ]
    dataset = inspect(make_zip(entries), tmp_path)
    assert dataset.splits == {"test": 1, "train": 3, "val": 2}
    assert dataset.class_counts == {"cats": 3, "dogs": 3}
    with zipfile.ZipFile(dataset.archive) as normalized:
        names = normalized.namelist()
    assert "train/cats/1.png" in names and not any(name.startswith("mydata") for name in names)


def test_content_hash_ignores_member_order_and_timestamps(make_zip, flat_dataset, tmp_path: Path) -> None:
    forward = inspect(make_zip(flat_dataset), tmp_path)
    shuffled_entries: list[tuple[object, bytes]] = []
    for name, data in reversed(flat_dataset):
        info = zipfile.ZipInfo(name, date_time=(2001, 2, 3, 4, 5, 6))
        shuffled_entries.append((info, data))
    backward = inspect(make_zip(shuffled_entries), tmp_path)
    assert forward.content_hash == backward.content_hash
    assert forward.archive_sha256 == backward.archive_sha256  # the normalized archive is byte-identical
    changed = [(name, data) for name, data in flat_dataset]
    changed[0] = (changed[0][0], flat_dataset[1][1])
    assert inspect(make_zip(changed), tmp_path).content_hash != forward.content_hash


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _attack_entries(png: Callable[..., bytes]) -> dict[str, tuple[list[tuple[object, bytes]], tuple[str, ...]]]:
    good = [("cats/a.png", png((1, 1, 1))), ("dogs/a.png", png((2, 2, 2)))]
    truncated = png((9, 9, 9), size=(64, 64))
    return {
        "traversal": (good + [("../x.png", png())], ("../x.png", "traversal")),
        "nested traversal": (good + [("cats/../../x.png", png())], ("cats/../../x.png", "traversal")),
        "absolute": (good + [("/etc/x.png", png())], ("/etc/x.png", "absolute")),
        "symlink": (good + [(_symlink("cats/link.png"), b"/etc/passwd")], ("cats/link.png", "symbolic link")),
        "bomb by ratio": (good + [("cats/bomb.png", b"\0" * (8 * 1024 * 1024))], ("cats/bomb.png", "ratio")),
        "non-image png": (good + [("cats/fake.png", b"this is text, not a png" * 10)], ("cats/fake.png", "not a readable image")),
        "truncated png": (good + [("dogs/cut.png", truncated[: len(truncated) // 2])], ("dogs/cut.png", "not a readable image")),
        "not an image extension": (good + [("cats/notes.txt", b"hello")], ("cats/notes.txt", "not an image")),
        "duplicate names": (good + [("cats/a.png", png((3, 3, 3)))], ("cats/a.png", "duplicate")),
        "single class": ([("cats/a.png", png()), ("cats/b.png", png((5, 5, 5)))], ("cats", "at least 2 classes")),
        "empty class": (good + [("birds/", b"")], ("birds", "empty")),
        "loose file": (good + [("a.png", png())], ("a.png", "class")),
        "nothing inside": ([("__MACOSX/x", b"")], ("no images",)),
    }


@pytest.mark.parametrize("attack", list(_attack_entries(lambda *a, **k: b"").keys()))
def test_unsafe_or_invalid_archives_are_rejected_naming_file_and_problem(
    attack: str, make_zip, images, tmp_path: Path
) -> None:
    entries, expected = _attack_entries(images["png"])[attack]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we write on purpose
        path = make_zip(entries)
    reason = rejection(path, tmp_path)
    for fragment in expected:
        assert fragment in reason, reason


def test_not_a_zip_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "photos.zip"
    path.write_bytes(b"%PDF-1.4 definitely not a zip" * 100)
    reason = rejection(path, tmp_path)
    assert "photos.zip" in reason and "not a zip" in reason


def test_limits_on_entry_count_and_declared_size(make_zip, flat_dataset, tmp_path: Path) -> None:
    few = ArchiveLimits(max_files=3)
    assert "limit is 3" in rejection(make_zip(flat_dataset), tmp_path, few)
    small = ArchiveLimits(max_uncompressed_bytes=100)
    assert "expands to" in rejection(make_zip(flat_dataset), tmp_path, small)
    tiny_upload = ArchiveLimits(max_upload_bytes=10)
    assert "uploads are limited" in rejection(make_zip(flat_dataset), tmp_path, tiny_upload)


def test_a_member_lying_about_its_size_is_caught_while_extracting(make_zip, flat_dataset, tmp_path: Path) -> None:
    path = make_zip(flat_dataset + [("cats/big.png", bytes(range(256)) * 40)])
    assert _shrink_declared_size(path, "cats/big.png", 50)
    reason = rejection(path, tmp_path)
    assert "cats/big.png" in reason


def _shrink_declared_size(path: Path, name: str, size: int) -> bool:
    """Patch both headers of one member to declare `size` uncompressed bytes."""
    raw = bytearray(path.read_bytes())
    encoded = name.encode()
    patched = 0
    for signature, size_offset, name_offset in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (index := raw.find(signature, start)) >= 0:
            start = index + 4
            if raw[index + name_offset : index + name_offset + len(encoded)] == encoded:
                raw[index + size_offset : index + size_offset + 4] = size.to_bytes(4, "little")
                patched += 1
    path.write_bytes(bytes(raw))
    return patched == 2
