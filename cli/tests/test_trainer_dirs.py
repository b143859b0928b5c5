"""`visionyard up --trainer-dir DIR` (repeatable) registers original-platform trainer directories with the runners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionyard.cli.main import build_parser, trainer_dirs_env


def _trainer(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train.py").write_text("")
    (root / "capabilities.json").write_text("{}")
    return root


def test_trainer_dirs_reach_the_runner_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    args = build_parser().parse_args(["up", "--trainer-dir", str(first), "--trainer-dir", str(second)])
    monkeypatch.setenv("VISIONYARD_RUNNER_TRAINER_DIRS", "/already/set")
    env = trainer_dirs_env(args.trainer_dirs)
    assert env["VISIONYARD_RUNNER_TRAINER_DIRS"].split(os.pathsep) == ["/already/set", str(first), str(second)]
    assert trainer_dirs_env([]) == {}


def test_a_directory_that_is_not_a_trainer_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: needs train.py and capabilities.json"):
        trainer_dirs_env([tmp_path / "empty"])
