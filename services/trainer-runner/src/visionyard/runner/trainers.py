"""Which trainers this runner can run, and with which interpreter.

A trainer is a package (its manifest under the `visionyard.trainers` entry point) or an original-platform
trainer directory (`train.py` + `capabilities.json`, from `trainer_dirs`). Each runs with its own
environment's interpreter, so the runner's environment never imports torch: a directory's own
`venv/bin/python` when it has one; else the interpreter of the environment its manifest names
(`environment`, mapped by the `trainer_envs` setting); else the runner's `trainer_python`. A trainer
whose environment this runner lacks is not advertised, and the log says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from visionyard.shared.manifest import TrainerManifest, installed_manifests, load_directory_manifest

log = logging.getLogger("visionyard.runner.trainers")

DIRECTORY_VENV_PYTHON = Path("venv") / "bin" / "python"


class TrainerUnavailable(Exception):
    """This runner cannot run the trainer; the message says why."""


def environment_python(path: str | Path) -> Path:
    """The interpreter of an environment given as a venv directory or as an interpreter path."""
    candidate = Path(path).expanduser()
    return candidate / "bin" / "python" if candidate.is_dir() else candidate


def resolve_interpreter(manifest: TrainerManifest, *, trainer_envs: Mapping[str, str], default_python: str) -> str:
    """The interpreter that runs `manifest`'s trainer here; TrainerUnavailable with the reason otherwise."""
    if manifest.directory is not None:
        own = Path(manifest.directory) / DIRECTORY_VENV_PYTHON
        if own.exists():
            return str(own)
    if manifest.environment is None:
        return default_python
    configured = trainer_envs.get(manifest.environment)
    if configured is None:
        known = ", ".join(sorted(trainer_envs)) or "none"
        raise TrainerUnavailable(
            f"environment {manifest.environment!r} is not configured on this runner "
            f"(VISIONYARD_RUNNER_TRAINER_ENVS; configured: {known})"
        )
    python = environment_python(configured)
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise TrainerUnavailable(f"environment {manifest.environment!r}: no executable interpreter at {python}")
    return str(python)


@dataclass(frozen=True)
class TrainerCatalog:
    """The trainers this runner advertises and the interpreter of each (by manifest name)."""

    manifests: list[TrainerManifest]
    interpreters: dict[str, str] = field(default_factory=dict)


def discover_manifests(trainer_dirs: Iterable[Path]) -> list[TrainerManifest]:
    """Installed trainer packages, then the trainer directories (a broken directory is logged and skipped)."""
    manifests = installed_manifests()
    for directory in trainer_dirs:
        try:
            manifests.append(load_directory_manifest(directory))
        except ValueError as error:
            log.error("trainer directory not usable, not advertised: %s", error)
    return manifests


def build_catalog(
    manifests: Iterable[TrainerManifest], *, trainer_envs: Mapping[str, str], default_python: str
) -> TrainerCatalog:
    """Keep the manifests this runner can run, each with its interpreter; log every one left out."""
    runnable: list[TrainerManifest] = []
    interpreters: dict[str, str] = {}
    for manifest in manifests:
        try:
            python = resolve_interpreter(manifest, trainer_envs=trainer_envs, default_python=default_python)
        except TrainerUnavailable as error:
            log.warning("trainer %s not advertised: %s", manifest.name, error,
                        extra={"trainer": manifest.name, "framework": manifest.framework})
            continue
        if manifest.name in interpreters:
            log.warning("trainer %s declared twice; keeping the first", manifest.name)
            continue
        runnable.append(manifest)
        interpreters[manifest.name] = python
    return TrainerCatalog(manifests=runnable, interpreters=interpreters)
