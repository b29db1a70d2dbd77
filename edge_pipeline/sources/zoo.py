"""Built-in models: a small CNN for digits, two architectures with the structures pruning must respect
(residual adds, concatenation, depthwise-separable convs), and EfficientNet-Lite0 with its published weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edge_pipeline.sources.pretrained import efficientnet_lite0_zoo


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """The digits teacher: three conv blocks and a linear head (about 0.2M params at width 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = (max(8, int(c * width)) for c in (64, 128, 128))
        self.features = nn.Sequential(
            _conv_bn(in_channels, c1), _conv_bn(c1, c2), nn.MaxPool2d(2), _conv_bn(c2, c3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1), _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class TinyMobileNetV2(nn.Module):
    """MobileNetV2-style: inverted residuals with depthwise convs, residual adds, and one concat branch."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        def c(n):
            return max(8, int(n * width))
        self.stem = _conv_bn(in_channels, c(16))
        self.blocks = nn.Sequential(
            InvertedResidual(c(16), c(16), 1, 4), InvertedResidual(c(16), c(24), 2, 4),
            InvertedResidual(c(24), c(24), 1, 4), InvertedResidual(c(24), c(32), 2, 4),
            InvertedResidual(c(32), c(32), 1, 4),
        )
        # Two parallel heads concatenated: pruning must keep the concat's channel bookkeeping right.
        self.branch_a = _conv_bn(c(32), c(32), 1)
        self.branch_b = _conv_bn(c(32), c(32), 3)
        self.head = _conv_bn(2 * c(32), c(64), 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c(64), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.head(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1))
        return self.classifier(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """ResNet-style: basic blocks with identity and projection shortcuts."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        def c(n):
            return max(8, int(n * width))
        self.stem = _conv_bn(in_channels, c(32))
        self.layer1 = nn.Sequential(BasicBlock(c(32), c(32), 1), BasicBlock(c(32), c(32), 1))
        self.layer2 = nn.Sequential(BasicBlock(c(32), c(64), 2), BasicBlock(c(64), c(64), 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c(64), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# name -> constructor(num_classes, in_channels, width); the teacher stage trains (or fine-tunes) what it builds
MODEL_ZOO: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "mobilenetv2-tiny": TinyMobileNetV2,
    "resnet-tiny": TinyResNet,
    "efficientnet-lite0": efficientnet_lite0_zoo,  # published ImageNet weights, a new classifier
}
