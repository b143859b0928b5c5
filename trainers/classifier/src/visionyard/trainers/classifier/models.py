"""The classifier architectures: a small CNN and a tiny residual network (any environment), and standard
backbones from timm (resnet18/50, mobilenet_v3, efficientnet_b0, convnext_tiny) where timm is installed —
the ultralytics trainer environment; timm is imported only when a backbone is asked for.

Backbones start from scratch, or from local weights: `<VISIONYARD_RUNNER_WEIGHTS_DIR>/<model>.pth`
(or `.pt`/`.safetensors`), a timm state dict for the same architecture; its classifier head is dropped
when the class count differs. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

SMALL_MODELS = ("simple_cnn", "tiny_resnet")
# Platform model name → timm architecture.
BACKBONES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenet_v3": "mobilenetv3_large_100",
    "efficientnet_b0": "efficientnet_b0",
    "convnext_tiny": "convnext_tiny",
}
MODEL_NAMES = SMALL_MODELS + tuple(BACKBONES)
WEIGHTS_DIR_VARIABLE = "VISIONYARD_RUNNER_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def _conv_bn(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SimpleCNN(nn.Module):
    """Three conv blocks, global average pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 16),
            nn.MaxPool2d(2),
            _conv_bn(16, 32),
            nn.MaxPool2d(2),
            _conv_bn(32, 64),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of (N, C, H, W) images."""
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, out_channels, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """Residual sum, then ReLU."""
        return self.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A stem and three residual blocks (16, 32, 64 channels), global pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16)
        self.stages = nn.Sequential(
            BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 64, stride=2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of (N, C, H, W) images."""
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def build_model(name: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """The named architecture; raises `ValueError` for an unknown name."""
    if name == "simple_cnn":
        return SimpleCNN(in_channels, num_classes)
    if name == "tiny_resnet":
        return TinyResNet(in_channels, num_classes)
    if name in BACKBONES:
        import timm  # only the trainer environment has it (with torchvision)

        return timm.create_model(BACKBONES[name], pretrained=False, num_classes=num_classes, in_chans=in_channels)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def local_weights(name: str) -> Path | None:
    """The local pretrained weights file of a backbone, if the runner's weights directory has one."""
    directory = os.environ.get(WEIGHTS_DIR_VARIABLE)
    if not directory:
        return None
    for suffix in WEIGHT_SUFFIXES:
        candidate = Path(directory) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Load a backbone state dict, skipping tensors whose shape differs (the head); the skipped keys."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    return skipped
