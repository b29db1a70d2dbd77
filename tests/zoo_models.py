"""The models people bring, built from their own libraries, for the model-zoo check (``pytest -m zoo``).

timm, torchvision and transformers architectures with ``pretrained=False`` (or from a config), handed to recipes
as ``zoo_models:NAME``; the tests train them briefly (``train_briefly``) and pass the weights with ``--weights``,
as a user hands in a trained model. Data: 64x64 crops of the colour photographs scikit-image ships, the class being
the photograph (real image statistics, learnable in a few epochs), and token ids for the BERT-style encoder,
yielded as a tokenizer yields them (``input_ids, token_type_ids, attention_mask``: not forward's order).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

CLASSES = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg")
SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.cache
def importable_torchvision() -> None:
    """The package registry here has only a CUDA build of torchvision, whose C extension needs libtorch_cuda: its
    ``import`` (and so timm's) fails with ``operator torchvision::nms does not exist``. Declaring the two operator
    schemas it registers lets the pure-Python part import. A workaround for this test environment only: no model
    here calls torchvision's C operators."""
    try:
        import torchvision  # noqa: F401
        return
    except (RuntimeError, ImportError):
        pass
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    importable_torchvision.lib = lib  # kept alive: the schemas go with the Library object
    import torchvision  # noqa: F401


def _timm(name: str, **kw):
    importable_torchvision()
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=len(CLASSES), **kw).eval()


def mobilenetv3_small_100():
    return _timm("mobilenetv3_small_100")


def mobilevit_xxs():
    return _timm("mobilevit_xxs")


def efficientvit_m0():
    return _timm("efficientvit_m0", img_size=SIZE)


def tv_mobilenet_v3_small():
    importable_torchvision()
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    return mobilenet_v3_small(num_classes=len(CLASSES)).eval()


def bert_tiny():
    """A BERT-style encoder from a config (two layers, hidden 64), returning ``SequenceClassifierOutput``.
    (transformers imports torchvision where it is installed, so it needs the same workaround here.)"""
    importable_torchvision()
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@functools.cache
def _photo_crops(n_per_class: int = 100) -> tuple[np.ndarray, np.ndarray]:
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        with Image.open(folder / name) as img:
            img = img.convert("RGB")
            for _ in range(n_per_class):
                side = int(min(img.size) * rng.uniform(0.3, 0.8))
                left = int((img.size[0] - side) * rng.random())
                top = int((img.size[1] - side) * rng.random())
                crop = img.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR)
                xs.append(np.asarray(crop, dtype=np.float32) / 255.0)
                ys.append(label)
    x = (np.stack(xs) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), np.asarray(ys, dtype=np.int64)


def photo_crops():
    """(x, y): 64x64 RGB crops, ImageNet mean/std, class = the photograph."""
    return _photo_crops()


VOCAB, SEQ = 96, 16


class TokenItems(torch.utils.data.Dataset):
    """Sentences of token ids, class = whether token 7 occurs; items are dicts in a tokenizer's key order."""

    def __init__(self, n: int = 400):
        rng = np.random.default_rng(1)
        self.ids = rng.integers(10, VOCAB, (n, SEQ))
        self.lengths = rng.integers(6, SEQ + 1, n)
        self.y = rng.integers(0, 2, n)
        for i in np.flatnonzero(self.y):
            self.ids[i, rng.integers(1, self.lengths[i])] = 7
        for i, n_tok in enumerate(self.lengths):
            self.ids[i, n_tok:] = 0
        self.ids[:, 0] = 1  # [CLS]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        mask = (np.arange(SEQ) < self.lengths[i]).astype(np.int64)
        return {"input_ids": self.ids[i], "token_type_ids": np.zeros(SEQ, np.int64), "attention_mask": mask,
                "label": int(self.y[i])}


def token_items():
    return TokenItems()


def train_briefly(model: torch.nn.Module, source: str, epochs: int, lr: float = 3e-3) -> dict:
    """A few epochs of plain cross-entropy training on the source's train split (named inputs bound to forward's
    parameters, the first output scored), so the weights mean something; returns the state_dict ``--weights``
    takes."""
    from torch.nn import functional as F

    from edge_pipeline.interface import FlatModel, bind_inputs
    from edge_pipeline.sources import load_data
    from edge_pipeline.training import fit

    data = load_data(source)
    if data.input_names:
        data = data.ordered_as(bind_inputs(model, data.input_names))
    flat = FlatModel(model)
    fit(flat, data.train, epochs, lr, batch_loss=lambda xs, y: F.cross_entropy(flat(*xs)[0], y))
    # A few dozen steps move BatchNorm's running statistics little where its momentum is small (torchvision's
    # MobileNetV3: 0.01): re-estimate them over the train split, as after any short fine-tune.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    model.train()
    with torch.no_grad():
        for xs, _ in data.train.batches(64):
            flat(*map(torch.from_numpy, xs))
    return model.eval().state_dict()
