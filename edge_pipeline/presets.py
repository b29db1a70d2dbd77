"""Named things a recipe may refer to that the data sources implement: input scalings and class lists."""

from __future__ import annotations

# Named input scalings, after what they are: scale, then (x - mean) / std per channel.
PREPROCESS_PRESETS = {
    "imagenet": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},  # torchvision
    "lite": {"scale": 1.0, "mean": [127.0], "std": [128.0]},  # (x - 127) / 128: TFLite's EfficientNet-Lite
    "inception": {"scale": 1.0, "mean": [127.5], "std": [127.5]},  # (x - 127.5) / 127.5: to [-1, 1]
}

IMAGENET_1K = "imagenet-1k"  # the shipped class list's name in a recipe
