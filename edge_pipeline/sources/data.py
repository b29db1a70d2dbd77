"""Data sources: ``zoo:digits``, ``.npz`` files, image folders and ``package.module:callable``.

Every source yields the same :class:`Splits`: float32 inputs in NCHW (or any fixed shape), int64 labels or
``None``, and a test split that nothing but the final evaluation ever touches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pipeline.errors import PipelineError

SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str] | None
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def fingerprint(self) -> str:
        """sha256 over all arrays: a changed data set changes every downstream cache key."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for arr in (split.x, split.y):
                if arr is not None:
                    h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                    h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def split_arrays(x: np.ndarray, y: np.ndarray | None, classes: list[str] | None, source: str,
                 fractions: tuple[float, float] = (0.6, 0.2), seed: int = SPLIT_SEED) -> Splits:
    """Seeded stratified train/val/test split (60/20/20 by default)."""
    from sklearn.model_selection import train_test_split

    # A fresh C-order copy: a view such as images[:, None] has odd strides on its size-1 axis, which
    # torch.export reads as a channels-last dim order (ExecuTorch then rejects standard-layout inputs).
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    idx = np.arange(len(x))
    strat = y if y is not None else None
    test_frac = 1.0 - fractions[0] - fractions[1]
    rest, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=strat)
    val_rel = fractions[1] / (fractions[0] + fractions[1])
    train, val = train_test_split(rest, test_size=val_rel, random_state=seed,
                                  stratify=None if y is None else y[rest])
    def pick(ids):
        return Split(x[np.sort(ids)], None if y is None else y[np.sort(ids)].astype(np.int64))
    return Splits(pick(train), pick(val), pick(test), classes, source)


def digits(size: int = 8) -> Splits:
    """scikit-learn's 8x8 handwritten digits (shipped inside the package), scaled to [0, 1], NCHW.

    ``size`` > 8 upsamples bilinearly, giving a bigger input for latency benchmarks (``zoo:digits32``).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    if size != 8:
        import torch

        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                            align_corners=False).numpy()
    name = "zoo:digits" if size == 8 else f"zoo:digits{size}"
    return split_arrays(x, d.target.astype(np.int64), [str(i) for i in range(10)], name)


DATA_ZOO = {"digits": lambda: digits(8), "digits32": lambda: digits(32)}


def load_npz(path: Path) -> Splits:
    """An .npz with ``x`` (and optionally ``y``, ``classes``), or pre-split ``x_train``/``x_val``/``x_test``."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
        if {"x_train", "x_val", "x_test"} <= keys:
            def get(s):
                return Split(z[f"x_{s}"].astype(np.float32),
                                              z[f"y_{s}"].astype(np.int64) if f"y_{s}" in keys else None)
            return Splits(get("train"), get("val"), get("test"), classes, str(path))
        if "x" not in keys:
            raise PipelineError(f"{path} has no array 'x' (found: {', '.join(sorted(keys))})",
                                where=str(path), hint="save inputs as x= (and labels as y=) with np.savez")
        y = z["y"] if "y" in keys else None
        if classes is None and y is not None:
            classes = [str(c) for c in range(int(y.max()) + 1)]
        return split_arrays(z["x"], y, classes, str(path))


def load_image_folder(path: Path) -> Splits:
    """One sub-folder per class; images are converted to grayscale float32 in [0, 1] at the first image's size."""
    from PIL import Image

    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise PipelineError(f"image folder {path} has no class sub-folders", where=str(path),
                            hint="lay images out as FOLDER/<class>/<image>.png")
    xs, ys, size = [], [], None
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in {".png", ".jpg", ".jpeg", ".bmp", ".pgm"}:
                continue
            img = Image.open(f).convert("L")
            size = size or img.size
            xs.append(np.asarray(img.resize(size), dtype=np.float32)[None] / 255.0)
            ys.append(label)
    if not xs:
        raise PipelineError(f"image folder {path} holds no images", where=str(path))
    return split_arrays(np.stack(xs), np.array(ys), [d.name for d in class_dirs], str(path))
