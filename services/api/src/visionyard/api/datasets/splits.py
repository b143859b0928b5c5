"""Split resolution: which images of a dataset version are train, val or test.

`auto` shuffles every image with the seed and cuts by `default_ratio`; `manual` takes the user's
lists, which must place every image exactly once; `partial` takes the user's lists and splits the
rest automatically. The result is a plain `{split: [relative paths]}`, stored per version and
handed to the trainer in its job file (`TrainerJob.split`).
"""

from __future__ import annotations

import random

from visionyard.api.errors import InvalidInput

SPLIT_NAMES = ("train", "val", "test")


def check_ratio(ratio: list[float]) -> None:
    """InvalidInput unless `ratio` is 2 or 3 fractions summing to 1 with a positive train share."""
    if len(ratio) not in (2, 3):
        raise InvalidInput("default_ratio", f"needs 2 (train, val) or 3 (train, val, test) numbers, got {len(ratio)}")
    if any(part < 0 or part > 1 for part in ratio) or abs(sum(ratio) - 1.0) > 1e-6:
        raise InvalidInput("default_ratio", f"fractions must be within [0, 1] and sum to 1, got {ratio}")
    if ratio[0] <= 0:
        raise InvalidInput("default_ratio", "the train fraction must be positive")


def resolve_split(
    filenames: list[str],
    *,
    method: str,
    ratio: list[float],
    seed: int,
    requested: dict[str, list[str]] | None,
) -> dict[str, list[str]]:
    """Every image's split; raises InvalidInput naming the entry when the request does not fit the version."""
    check_ratio(ratio)
    requested = requested or {}
    if method == "auto" and requested:
        raise InvalidInput("splits", "only method 'manual' or 'partial' takes explicit splits")
    if method in ("manual", "partial") and not requested:
        raise InvalidInput("splits", f"method {method!r} needs splits, e.g. {{\"train\": [...], \"val\": [...]}}")
    known = set(filenames)
    placed: dict[str, str] = {}
    result: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES[: len(ratio)]}
    for split, members in requested.items():
        if split not in SPLIT_NAMES:
            raise InvalidInput("splits", f"unknown split {split!r}; use {', '.join(SPLIT_NAMES)}")
        result.setdefault(split, [])
        for index, filename in enumerate(members):
            where = f"splits.{split}[{index}]"
            if filename not in known:
                raise InvalidInput(where, f"{filename!r} is not an image of this dataset version")
            if filename in placed:
                raise InvalidInput(where, f"{filename!r} is already in split {placed[filename]!r}")
            placed[filename] = split
            result[split].append(filename)
    rest = [name for name in sorted(filenames) if name not in placed]
    if method == "manual" and rest:
        raise InvalidInput(
            "splits", f"{len(rest)} image(s) are in no split (first: {rest[0]!r}); list them, or use method 'partial'"
        )
    random.Random(seed).shuffle(rest)
    cut_train = round(len(rest) * ratio[0])
    cut_val = cut_train + round(len(rest) * ratio[1]) if len(ratio) == 3 else len(rest)
    result["train"] += rest[:cut_train]
    result["val"] += rest[cut_train:cut_val]
    if len(ratio) == 3:
        result["test"] += rest[cut_val:]
    return {split: sorted(members) for split, members in result.items()}
