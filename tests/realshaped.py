"""Real-shaped models and data for the end-to-end tests, given to recipes as ``realshaped:NAME``.

Small (16-64 px, a few layers) so each runs every stage in seconds, but shaped like what users ship: an RGB
CNN from an image folder, a detector-like model with three outputs and no labels, a Conv1d keyword spotter
streamed from a torch Dataset, and a transformer encoder taking int64 token ids and an attention mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# --- RGB images: an image folder of coloured shapes, class = colour -------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 220)}


def write_rgb_folder(root: Path, per_class: int = 16, size: int = 24) -> Path:
    """JPEG and PNG photos of noisy coloured discs at random places, one sub-folder per class."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(0, 120, (size + 8, size + 4, 3), dtype=np.uint8)  # not square: resize + crop matter
            img = Image.fromarray(bg)
            r = int(rng.integers(5, 9))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
            img.save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


# --- three outputs, no labels (a face-detector-like head: boxes, landmarks, probability) ----------------------

class ThreeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.boxes = nn.Linear(32, 4)
        self.landmarks = nn.Linear(32, 10)
        self.prob = nn.Linear(32, 2)

    def forward(self, image):
        f = self.body(image)
        return {"boxes": self.boxes(f), "landmarks": self.landmarks(f), "prob": F.softmax(self.prob(f), dim=1)}


def three_heads() -> nn.Module:
    return ThreeHeads().eval()


def face_crops():
    """Unlabelled 24x24 RGB crops: inputs only, no labels (x, None)."""
    rng = np.random.default_rng(1)
    x = rng.random((160, 3, 24, 24), dtype=np.float32)
    x[:, 0] += np.linspace(0, 1, 24, dtype=np.float32)[None, :, None]  # some structure to learn
    return x, None


# --- Conv1d keyword spotting, streamed from a torch Dataset -----------------------------------------------------

class Keywords(torch.utils.data.Dataset):
    """1-D signals (1 x 400 samples); class = the frequency of the tone in it. Generated on access, never held
    in memory as a whole; ``targets`` lets the pipeline read the labels without reading the signals."""

    freqs = (3, 7, 12, 20)

    def __init__(self, n: int = 240):
        self.targets = [i % len(self.freqs) for i in range(n)]
        self.classes = [f"kw{f}" for f in self.freqs]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        t = np.linspace(0, 1, 400, dtype=np.float32)
        wave = np.sin(2 * np.pi * self.freqs[self.targets[i]] * t + rng.random() * 6) * rng.uniform(0.5, 1.0)
        x = (wave + 0.3 * rng.standard_normal(400)).astype(np.float32)[None]
        return torch.from_numpy(x), self.targets[i]


def keywords():
    return Keywords()


class KeywordNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv1d(1, 32, 9, stride=2, padding=4), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 48, 9, stride=2, padding=4), nn.BatchNorm1d(48), nn.ReLU(),
            nn.Conv1d(48, 64, 5, stride=2, padding=2), nn.BatchNorm1d(64), nn.ReLU())
        self.classifier = nn.Linear(64, classes)

    def forward(self, signal):
        return self.classifier(self.features(signal).mean(-1))


def keyword_net() -> nn.Module:
    return KeywordNet()


# --- a transformer encoder on int64 token ids and an attention mask ---------------------------------------------

VOCAB, SEQ = 32, 12


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(1, SEQ, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) + self.pos
        pad = attention_mask == 0
        a, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        x = self.norm1(x + a)
        x = self.norm2(x + self.ff(x))
        keep = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp(min=1))


def tiny_encoder() -> nn.Module:
    return TinyEncoder()


def token_data():
    """Token ids (int64, padded with 0) and an int64 attention mask; label: is token 5 more frequent than 9?"""
    rng = np.random.default_rng(2)
    n = 300
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64)
    lengths = rng.integers(6, SEQ + 1, n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    ids[rng.random((n, SEQ)) < 0.15] = 5
    ids[rng.random((n, SEQ)) < 0.15] = 9
    ids[mask == 0] = 0
    y = ((ids == 5).sum(1) > (ids == 9).sum(1)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}, y


def token_splits():
    """Dict-shaped inputs, as tokenizers give them: returned as a torch Dataset of dict items."""
    inputs, y = token_data()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
                    "label": int(y[i])}

    return Tokens()


def train_briefly(model: nn.Module, source: str, epochs: int = 8) -> dict:
    """A few epochs of plain training on the source's own train split, so the weights mean something; returns
    the state_dict a recipe's ``weights:`` points at."""
    from edge_pipeline.sources import load_data
    from edge_pipeline.training import fit

    return fit(model, load_data(source).train, epochs, 3e-3).state_dict()


# --- MTCNN's ONet, layer for layer (facenet-pytorch's; that wheel pins torch < 2.3, so the architecture is
# mirrored here): PReLU, ceil-mode max pooling, a permute + view flatten, and a tuple of three outputs ---------

class ONetLike(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def onet() -> nn.Module:
    return ONetLike().eval()


def face_crops48():
    """Unlabelled 48x48 RGB crops, ONet's input."""
    rng = np.random.default_rng(3)
    x = rng.random((120, 3, 48, 48), dtype=np.float32) * 2 - 1
    return x, None
