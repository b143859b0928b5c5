"""Make Ultralytics work offline and quietly; call `configure()` before the first `import ultralytics`.

Ultralytics would otherwise download weights (`yolo11n.pt` for a bare model name or an AMP check),
fonts (Arial.ttf for plots), datasets named in a data.yaml, and pip-install missing packages; it would
also send anonymous usage events and register MLflow/Comet/ClearML callbacks of its own. Here its
settings live in the job's directory (`YOLO_CONFIG_DIR`), `YOLO_OFFLINE` marks the machine offline,
auto-install is off, plots are off (no font download), every integration is disabled, and weights
are only ever read from `VISIONYARD_RUNNER_WEIGHTS_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR_VARIABLE = "VISIONYARD_RUNNER_WEIGHTS_DIR"
_INTEGRATIONS_OFF = {
    "sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False, "raytune": False,
    "tensorboard": False, "wandb": False, "vscode_msg": False, "openvino_msg": False,
}


def configure(config_dir: Path, *, verbose: bool = False) -> None:
    """Point Ultralytics at `config_dir` and switch off everything that reaches the network."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    # Progress bars redraw with carriage returns; each would become a log event. The SDK reports instead.
    os.environ["YOLO_VERBOSE"] = "true" if verbose else "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ultralytics.utils import SETTINGS

    SETTINGS.update({**_INTEGRATIONS_OFF, "datasets_dir": str(config_dir / "datasets"),
                     "weights_dir": str(config_dir / "weights"), "runs_dir": str(config_dir / "runs")})


def weights_dir() -> Path | None:
    """The runner's local pretrained-weights directory, if configured."""
    value = os.environ.get(WEIGHTS_DIR_VARIABLE)
    return Path(value) if value else None


def local_weights(model_name: str) -> Path | None:
    """`<weights dir>/<model_name>.pt` when it exists."""
    directory = weights_dir()
    if directory is None:
        return None
    candidate = directory / f"{model_name}.pt"
    return candidate if candidate.is_file() else None
