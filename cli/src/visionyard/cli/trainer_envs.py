"""Trainer environments: interpreters with torch/Ultralytics, kept outside the checkout and reused.

PyPI's torchvision links the CUDA build of torch and cannot load beside the services' CPU torch
(shared/NOTES.md), so trainers that need it run in an environment of their own. Each is a venv named
after the sha256 of its pinned requirements file (plus the Python version and machine), under
`VISIONYARD_TRAINER_ENVS_DIR` (default `~/.cache/visionyard/trainer-envs`): built once (about 6 GB,
a few minutes), reused by every checkout, demo, test run and CI job on the machine; a changed pin
builds a new one. The project's own packages (shared + the trainer) are installed into it editable,
without dependencies, from the checkout that asks, so the trainer runs that checkout's code.

`python -m visionyard.cli.trainer_envs ensure [NAME ...]` builds (or refreshes) them; `visionyard up`
and the demo pass `runner_setting()` to runners as `VISIONYARD_RUNNER_TRAINER_ENVS`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_DIR_VARIABLE = "VISIONYARD_TRAINER_ENVS_DIR"
RUNNER_SETTING = "VISIONYARD_RUNNER_TRAINER_ENVS"
COMPLETE_MARKER = ".visionyard-env-complete"
# Which checkout the editable project packages point at (the last `ensure` wins).
CHECKOUT_MARKER = ".visionyard-checkout"


@dataclass(frozen=True)
class EnvSpec:
    """One trainer environment: its pinned third-party requirements and the project packages it runs."""

    name: str
    requirements: str  # relative to the checkout root
    packages: tuple[str, ...]  # project package folders, installed editable without dependencies


SPECS: dict[str, EnvSpec] = {
    "ultralytics": EnvSpec(
        name="ultralytics",
        requirements="trainers/yolo/requirements-env.txt",
        packages=("shared", "trainers/yolo", "trainers/classifier"),
    ),
}


def checkout_root() -> Path:
    """The checkout this (editable) CLI was installed from."""
    return Path(__file__).resolve().parents[4]


def envs_dir() -> Path:
    """Where trainer environments live (outside any checkout)."""
    configured = os.environ.get(ENV_DIR_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "visionyard" / "trainer-envs"


def env_key(spec: EnvSpec, root: Path) -> str:
    """sha256 (first 12 hex) of the requirements file, the Python version and the machine."""
    digest = hashlib.sha256((root / spec.requirements).read_bytes())
    digest.update(f"\0python{sys.version_info.major}.{sys.version_info.minor}\0{platform.machine()}".encode())
    return digest.hexdigest()[:12]


def env_path(spec: EnvSpec, root: Path) -> Path:
    """The environment's directory, e.g. `~/.cache/visionyard/trainer-envs/ultralytics-<hash>`."""
    return envs_dir() / f"{spec.name}-{env_key(spec, root)}"


def interpreter(path: Path) -> Path:
    """The environment's Python."""
    return path / "bin" / "python"


def is_complete(path: Path) -> bool:
    """Whether the environment was built to the end (a crash mid-build leaves no marker)."""
    return (path / COMPLETE_MARKER).exists() and interpreter(path).exists()


def _run(argv: Sequence[str], *, quiet: bool) -> None:
    print("+", " ".join(str(part) for part in argv), flush=True)
    subprocess.run([str(part) for part in argv], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


def ensure(name: str, *, root: Path | None = None, quiet: bool = True) -> Path:
    """Build the environment if missing, then point its project packages at `root`; returns its Python."""
    spec = SPECS[name]
    root = (root or checkout_root()).resolve()
    path = env_path(spec, root)
    python = interpreter(path)
    if not is_complete(path):
        # A half-built environment (killed mid-install) is rebuilt from scratch.
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building trainer environment {path} (once; several GB, a few minutes)", flush=True)
        _run([sys.executable, "-m", "venv", path], quiet=quiet)
        _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "-r", root / spec.requirements], quiet=quiet)
        (path / COMPLETE_MARKER).write_text(spec.requirements + "\n")
    recorded = path / CHECKOUT_MARKER
    wanted = f"{root}\n{' '.join(spec.packages)}"
    if not recorded.exists() or recorded.read_text().strip() != wanted:
        editable: list[str | Path] = []
        for package in spec.packages:
            editable += ["-e", root / package]
        _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
              *editable], quiet=quiet)
        recorded.write_text(wanted + "\n")
    return python


def available(*, root: Path | None = None) -> dict[str, Path]:
    """The built environments for this checkout's pins: name → interpreter."""
    root = (root or checkout_root()).resolve()
    found: dict[str, Path] = {}
    for name, spec in SPECS.items():
        try:
            path = env_path(spec, root)
        except OSError:
            continue  # an installed (non-checkout) CLI has no requirements files to hash
        if is_complete(path):
            found[name] = interpreter(path)
    return found


def runner_setting(*, root: Path | None = None) -> str:
    """`name=python,name=python` for `VISIONYARD_RUNNER_TRAINER_ENVS` ('' when none is built)."""
    return ",".join(f"{name}={python}" for name, python in sorted(available(root=root).items()))


def main(argv: Sequence[str] | None = None) -> int:
    """`ensure [NAME ...]` builds or refreshes environments; `show` prints the runner setting."""
    parser = argparse.ArgumentParser(prog="python -m visionyard.cli.trainer_envs")
    commands = parser.add_subparsers(dest="command", required=True)
    ensure_cmd = commands.add_parser("ensure", help="build the named environments (default: all) if missing")
    ensure_cmd.add_argument("names", nargs="*", help=f"any of {', '.join(SPECS)}")
    ensure_cmd.add_argument("--root", type=Path, default=None, help="checkout root (default: this CLI's)")
    ensure_cmd.add_argument("--verbose", action="store_true")
    commands.add_parser("show", help=f"print the {RUNNER_SETTING} value for this checkout")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(runner_setting())
        return 0
    unknown = sorted(set(args.names) - set(SPECS))
    if unknown:
        parser.error(f"unknown environment(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    for name in args.names or list(SPECS):
        python = ensure(name, root=args.root, quiet=not args.verbose)
        print(f"trainer environment {name}: {python}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
