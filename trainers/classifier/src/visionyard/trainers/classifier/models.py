"""The two classifier architectures: a small CNN and a tiny residual network."""

from __future__ import annotations

from torch import Tensor, nn

MODEL_NAMES = ("simple_cnn", "tiny_resnet")


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
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
