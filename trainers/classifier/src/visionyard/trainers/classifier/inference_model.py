"""A trained checkpoint loaded for inference, and the exact preprocessing the trainer applied.

Export and prediction share it, so an exported package, the platform's inference jobs and the
training loop all see an image the same way: RGB, bilinear resize to the trained side, scaled to
[0, 1], reduced to luminance for one-channel models, then normalized by the training set's stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from visionyard.trainers.classifier.data import to_channels
from visionyard.trainers.classifier.models import build_model

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


class CheckpointError(Exception):
    """The checkpoint cannot be used (not a classifier checkpoint, missing fields)."""


class ImageError(Exception):
    """An input file is not a readable image."""


@dataclass(frozen=True)
class InferenceModel:
    """An eval-mode model with what is needed to feed it images and name its outputs."""

    model: nn.Module
    model_name: str
    class_names: list[str]
    num_classes: int
    image_size: int
    in_channels: int
    mean: list[float]
    std: list[float]
    epoch: int | None

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing recipe, as written into an export's metadata.json."""
        return {
            "color": "rgb",
            "resize": [self.image_size, self.image_size],
            "resample": "bilinear",
            "scale": 1.0 / 255.0,
            "grayscale": self.in_channels == 1,
            "gray_weights": list(GRAY_WEIGHTS),
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW",
            "dtype": "float32",
        }

    def label_of(self, index: int) -> str:
        """The class name of an output index (`class_<i>` beyond the dataset's classes)."""
        return self.class_names[index] if index < len(self.class_names) else f"class_{index}"

    def preprocess(self, paths: list[Path]) -> torch.Tensor:
        """A normalized (N, C, H, W) float batch from image files; `ImageError` names a bad file."""
        arrays = [self._read(path) for path in paths]
        data = to_channels(np.stack(arrays), self.in_channels)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return torch.from_numpy(((data - mean) / std).astype(np.float32))

    def _read(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ImageError(f"{path.name} is not a readable image: {error}") from error


def load_inference_model(path: Path) -> InferenceModel:
    """Load a classifier checkpoint (as the trainer saved it) into an eval-mode model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path.name}: {error}") from error
    required = ("model_state", "model_name", "num_classes", "image_size", "in_channels", "normalization", "class_names")
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path.name} is not a classifier checkpoint (missing {', '.join(missing)})")
    model = build_model(str(state["model_name"]), in_channels=int(state["in_channels"]),
                        num_classes=int(state["num_classes"]))
    model.load_state_dict(state["model_state"])
    model.eval()
    return InferenceModel(
        model=model,
        model_name=str(state["model_name"]),
        class_names=[str(name) for name in state["class_names"]],
        num_classes=int(state["num_classes"]),
        image_size=int(state["image_size"]),
        in_channels=int(state["in_channels"]),
        mean=[float(v) for v in state["normalization"]["mean"]],
        std=[float(v) for v in state["normalization"]["std"]],
        epoch=state.get("epoch"),
    )
