"""Data sources: ``zoo:digits``, ``.npz`` files, image folders and ``package.module:callable``.

Every source yields the same :class:`Splits`: train, val and a test split that nothing but the final
evaluation touches. A split holds N inputs per sample (float32, int64 or bool; in the order of the model's
``forward`` parameters) and int64 class labels or none. In-memory arrays are an :class:`ArraySplit`; a torch
``Dataset`` (an image folder, a user's callable) is a :class:`StreamSplit` read batch by batch, so data need
not fit in RAM. Everything is checked before any training: labels, NaN/Inf, lengths, sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_pipeline.errors import PipelineError

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.6, 0.2)  # train, val; the rest is test
MIN_SAMPLES = 10  # fewer cannot give three non-empty splits worth measuring
LABEL_KEYS = ("label", "labels", "y", "target")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def _as_input(a, where: str) -> np.ndarray:
    """One input array in a dtype the backends take: floats as float32, integers as int64, bools kept."""
    a = np.asarray(a.numpy() if hasattr(a, "numpy") else a)
    if a.dtype.kind == "f":
        return np.ascontiguousarray(a, dtype=np.float32)
    if a.dtype.kind in "iu":
        return np.ascontiguousarray(a, dtype=np.int64)
    if a.dtype.kind == "b":
        return np.ascontiguousarray(a)
    raise PipelineError(f"input has dtype {a.dtype}, which no backend takes", where=where,
                        hint="give inputs as float, integer (token ids) or bool (masks) arrays")


def _is_scalar(v) -> bool:
    return isinstance(v, (int, np.integer, str)) or (hasattr(v, "ndim") and v.ndim == 0)


def split_item(item, where: str = "data") -> tuple[tuple, object, list[str] | None]:
    """A dataset item as (inputs, label or None, input names or None).

    ``x``, ``(x, label)``, ``((x1, x2), label)``, ``(x1, x2)`` and ``{"input_ids": .., "label": ..}`` all work;
    a 2-tuple whose second element is a scalar is (inputs, label).
    """
    label, names = None, None
    if isinstance(item, dict):
        label = next((item[k] for k in LABEL_KEYS if k in item), None)
        names = [k for k in item if k not in LABEL_KEYS]
        inputs = tuple(item[k] for k in names)
    elif isinstance(item, (tuple, list)) and len(item) == 2 and _is_scalar(item[1]):
        first, label = item
        if isinstance(first, dict):
            names = list(first)
            inputs = tuple(first.values())
        else:
            inputs = tuple(first) if isinstance(first, (tuple, list)) else (first,)
    elif isinstance(item, (tuple, list)):
        inputs = tuple(item)
    else:
        inputs = (item,)
    if not inputs:
        raise PipelineError("a data item holds no inputs", where=where)
    return inputs, label, names


class Split:
    """One split: ``len``, ``y`` (int64 labels or None), ``rows(idx)`` and ``batches(...)``."""

    y: np.ndarray | None

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, idx: Sequence[int]) -> tuple[np.ndarray, ...]:
        """The inputs of these rows, materialized."""
        raise NotImplementedError

    def batches(self, batch_size: int = 64, seed: int | None = None, rank: int = 0,
                world: int = 1) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray | None]]:
        """Batches of (inputs, labels) in order, or shuffled by ``seed``; under DDP each rank takes its stride
        of the same permutation (DistributedSampler's scheme, padded so every rank has as many batches)."""
        n = len(self)
        order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        if world > 1:
            per_rank = -(-n // world)
            order = np.concatenate([order, order[: per_rank * world - n]])[rank::world]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.rows(idx), None if self.y is None else self.y[idx]

    def update_hash(self, h) -> None:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class ArraySplit(Split):
    inputs: tuple[np.ndarray, ...]
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(self.inputs[0])

    def rows(self, idx) -> tuple[np.ndarray, ...]:
        return tuple(a[np.asarray(idx)] for a in self.inputs)

    @property
    def x(self) -> np.ndarray:
        """A single-input split's inputs as one array (in-memory splits only: a stream is never gathered)."""
        if len(self.inputs) != 1:
            raise TypeError("split has several inputs; use rows() or batches()")
        return self.inputs[0]

    def update_hash(self, h) -> None:
        for arr in (*self.inputs, self.y):
            if arr is not None:
                h.update(str(arr.shape).encode() + str(arr.dtype).encode())
                h.update(np.ascontiguousarray(arr).tobytes())


@dataclass(frozen=True, eq=False)
class StreamSplit(Split):
    """Rows ``indices`` of a torch Dataset, read on demand (never all in memory)."""

    dataset: object
    indices: np.ndarray
    y: np.ndarray | None
    where: str = "data"

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self, idx) -> tuple[np.ndarray, ...]:
        """Read on demand and checked as read: a NaN/Inf row stops the stage, naming the dataset's row."""
        rows = [int(self.indices[i]) for i in np.asarray(idx)]
        items = [split_item(self.dataset[r], self.where)[0] for r in rows]
        out = tuple(np.stack([_as_input(it[k], self.where) for it in items]) for k in range(len(items[0])))
        for k, a in enumerate(out):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = rows[int(np.argmax(~np.isfinite(a.reshape(len(a), -1)).all(1)))]
                raise PipelineError(f"input {k} holds NaN or Inf at dataset row {bad}", where=self.where,
                                    hint="clean or drop those rows before training")
        return out

    def update_hash(self, h) -> None:
        """Length, labels and up to 32 evenly spaced rows: reading a whole stream to hash it costs a pass."""
        h.update(str(len(self)).encode())
        if self.y is not None:
            h.update(self.y.tobytes())
        for a in self.rows(np.unique(np.linspace(0, len(self) - 1, min(32, len(self))).astype(int))):
            h.update(str(a.shape).encode() + np.ascontiguousarray(a).tobytes())


@dataclass(frozen=True, eq=False)
class ReorderedSplit(Split):
    """Another split's inputs in another order (named inputs bound to ``forward``'s parameters)."""

    inner: Split
    order: tuple[int, ...]

    @property
    def y(self) -> np.ndarray | None:
        return self.inner.y

    def __len__(self) -> int:
        return len(self.inner)

    def rows(self, idx) -> tuple[np.ndarray, ...]:
        inputs = self.inner.rows(idx)
        return tuple(inputs[i] for i in self.order)

    def update_hash(self, h) -> None:
        self.inner.update_hash(h)
        h.update(str(self.order).encode())


@dataclass(frozen=True, eq=False)
class Splits:
    train: Split
    val: Split
    test: Split
    classes: list[str] | None
    source: str
    input_names: list[str] | None = None  # from dict items; else forward's parameter names
    preprocessing: dict | None = field(default=None)  # what an app must do to an image, recorded in the bundle

    @property
    def example(self) -> tuple[np.ndarray, ...]:
        """Two training rows: the example batch the model interface is discovered from."""
        return self.train.rows(np.arange(min(2, len(self.train))))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's shape without the batch dimension."""
        return tuple(self.example[0].shape[1:])

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    def ordered_as(self, names: list[str]) -> Splits:
        """The same data with its named inputs in this order (``forward``'s, from ``interface.bind_inputs``)."""
        if self.input_names is None or list(self.input_names) == list(names):
            return self
        perm = tuple(self.input_names.index(n) for n in names)
        return dataclasses.replace(self, train=ReorderedSplit(self.train, perm), val=ReorderedSplit(self.val, perm),
                                   test=ReorderedSplit(self.test, perm), input_names=list(names))

    def fingerprint(self) -> str:
        """sha256 over the data: a changed data set changes every downstream cache key."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            split.update_hash(h)
        h.update(str(self.classes).encode() + str(self.preprocessing).encode())
        return h.hexdigest()


def check_labels(y, classes: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Labels as int64 class ids in 0..C-1 with class names; strings are mapped to sorted class names."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise PipelineError(f"labels have shape {y.shape}; expected one class id per sample", where=where)
    if y.dtype.kind in "USO":
        names = sorted({str(v) for v in y})
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[str(v)] for v in y], dtype=np.int64), classes or names
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise PipelineError(f"label at row {bad[0]} is {y[bad[0]]}, not a class id", where=where,
                                hint="labels are integer class ids (or class-name strings); give no labels for "
                                     "regression and use a metric such as cosine")
    elif y.dtype.kind not in "iub":
        raise PipelineError(f"labels have dtype {y.dtype}; expected integer class ids or strings", where=where)
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        r = int(np.argmin(y))
        raise PipelineError(f"label at row {r} is {y[r]}; class ids start at 0", where=where,
                            hint="map labels to 0..C-1, or give class names as strings")
    n = max(int(y.max()) + 1 if len(y) else 0, len(classes or []))
    if classes is not None and len(y) and y.max() >= len(classes):
        r = int(np.argmax(y))
        raise PipelineError(f"label at row {r} is {y[r]}, but only {len(classes)} classes are named", where=where)
    return y, classes or [str(i) for i in range(n)]


def check_finite(inputs: Sequence[np.ndarray], where: str, offset: int = 0) -> None:
    for k, a in enumerate(inputs):
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(1)
            if bad.any():
                raise PipelineError(f"input {k} holds NaN or Inf at row {offset + int(np.argmax(bad))}",
                                    where=where, hint="clean or drop those rows before training")


def _check_sizes(n: int, y: np.ndarray | None, where: str) -> None:
    if n < MIN_SAMPLES:
        raise PipelineError(f"only {n} samples; at least {MIN_SAMPLES} are needed for train, val and test splits",
                            where=where, hint="give more data")
    if y is not None and len(np.unique(y)) < 2:
        raise PipelineError(f"every label is {y[0]}: a single class cannot be learned or measured", where=where,
                            hint="give at least two classes, or no labels for a model scored against its float "
                                 "outputs")


def split_indices(n: int, y: np.ndarray | None, fractions=SPLIT_FRACTIONS, seed: int = SPLIT_SEED):
    """Seeded train/val/test indices, stratified by class where every class allows it, else plain."""
    from sklearn.model_selection import train_test_split

    def cut(idx, size, labels):
        try:
            return train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
        except ValueError:  # a class with one member, or more classes than the split has rows
            return train_test_split(idx, test_size=size, random_state=seed)

    idx = np.arange(n)
    rest, test = cut(idx, 1.0 - fractions[0] - fractions[1], y)
    train, val = cut(rest, fractions[1] / (fractions[0] + fractions[1]), None if y is None else y[rest])
    return np.sort(train), np.sort(val), np.sort(test)


def split_arrays(inputs, y, classes: list[str] | None, source: str, fractions=SPLIT_FRACTIONS,
                 seed: int = SPLIT_SEED, input_names: list[str] | None = None,
                 preprocessing: dict | None = None) -> Splits:
    """Check and split in-memory arrays (one array or a tuple of them, one row per sample)."""
    where = f"data {source}"
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    # A fresh C-order copy: a view such as images[:, None] has odd strides on its size-1 axis, which
    # torch.export reads as a channels-last dim order (ExecuTorch then rejects standard-layout inputs).
    inputs = tuple(np.array(_as_input(a, where), order="C", copy=True) for a in inputs)
    lengths = [len(a) for a in inputs] + ([] if y is None else [len(y)])
    if len(set(lengths)) > 1:
        what = [f"input {i}: {n}" for i, n in enumerate(lengths[:len(inputs)])] + (
            [] if y is None else [f"labels: {len(y)}"])
        raise PipelineError(f"inputs and labels have different lengths ({', '.join(what)})", where=where,
                            hint="one row per sample in every array")
    if y is not None:
        y, classes = check_labels(y, classes, f"{where}: labels")
    _check_sizes(lengths[0], y, where)
    check_finite(inputs, where)
    parts = split_indices(lengths[0], y, fractions, seed)

    def pick(ids):
        return ArraySplit(tuple(a[ids] for a in inputs), None if y is None else y[ids])
    return Splits(*(pick(p) for p in parts), classes, source, input_names, preprocessing)


def split_dataset(dataset, source: str, classes: list[str] | None = None, preprocessing: dict | None = None,
                  seed: int = SPLIT_SEED, fractions=SPLIT_FRACTIONS) -> Splits:
    """Split a torch Dataset by index; only its labels are read up front (``targets`` when it has them)."""
    where = f"data {source}"
    n = len(dataset)
    if n == 0:
        raise PipelineError("the dataset is empty", where=where)
    _, label, names = split_item(dataset[0], where)
    y = None
    if label is not None:
        y, classes = check_labels(np.asarray(dataset_labels(dataset, where)), classes, f"{where}: labels")
    _check_sizes(n, y, where)
    parts = split_indices(n, y, fractions, seed)

    def pick(ids):
        return StreamSplit(dataset, ids, None if y is None else y[ids], where)
    return Splits(*(pick(p) for p in parts), classes, source, names, preprocessing)


def dataset_labels(dataset, where: str) -> list:
    """A Dataset's labels: its ``targets`` where it has them (read without decoding a single input), else
    each item's label."""
    n = len(dataset)
    raw = getattr(dataset, "targets", None)
    if raw is not None and len(raw) == n:
        return list(raw)
    return [split_item(dataset[i], where)[1] for i in range(n)]


def presplit(parts: dict, source: str, classes: list[str] | None = None) -> Splits:
    """Train/val/test given by the user (arrays or Datasets per split), checked like any other source."""
    missing = {"train", "val", "test"} - set(parts)
    if missing:
        raise PipelineError(f"data splits missing: {', '.join(sorted(missing))}", where=f"data {source}",
                            hint="return a dict with train, val and test")
    out, names, all_labels = {}, None, []
    for s in ("train", "val", "test"):
        where = f"data {source}: {s}"
        v = parts[s]
        if _is_arrays(v):
            x, y = v
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            x = tuple(_as_input(a, where) for a in x)
            if len({len(a) for a in x} | ({len(y)} if y is not None else set())) > 1:
                raise PipelineError("inputs and labels have different lengths", where=where)
            check_finite(x, where)
            out[s] = (x, y)
        else:
            ds = getattr(v, "dataset", v)  # a DataLoader streams its dataset
            if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
                raise PipelineError(f"split '{s}' is neither (x, y) arrays nor a non-empty Dataset", where=where)
            _, label, names = split_item(ds[0], where)
            y = None if label is None else dataset_labels(ds, where)
            out[s] = (ds, y)
        all_labels.append(out[s][1])
    has = [lab is not None for lab in all_labels]
    if any(has) and not all(has):
        raise PipelineError("some splits have labels and others not", where=f"data {source}")
    if all(has):
        joined, classes = check_labels(np.concatenate([np.asarray(lab) for lab in all_labels]), classes,
                                       f"data {source}: labels")
        bounds = np.cumsum([0] + [len(lab) for lab in all_labels])
        all_labels = [joined[bounds[i]:bounds[i + 1]] for i in range(3)]
    splits = []
    for (s, (v, _)), y in zip(out.items(), all_labels, strict=True):
        if isinstance(v, tuple):
            splits.append(ArraySplit(v, y))
        else:
            splits.append(StreamSplit(v, np.arange(len(v)), y, f"data {source}: {s}"))
        if len(splits[-1]) == 0:
            raise PipelineError(f"split '{s}' is empty", where=f"data {source}: {s}")
    return Splits(*splits, classes, source, names)


def _is_arrays(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and (
        isinstance(v[0], np.ndarray) or (isinstance(v[0], (tuple, list)) and v[0] and isinstance(v[0][0], np.ndarray)))


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


def load_npz(path: Path, fractions=SPLIT_FRACTIONS) -> Splits:
    """An .npz with ``x`` (or ``x0``, ``x1``, ... for several inputs) and optionally ``y`` and ``classes``; or
    pre-split ``x_train``/``x_val``/``x_test`` (with ``y_<split>``)."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
        if {"x_train", "x_val", "x_test"} <= keys:
            return presplit({s: (z[f"x_{s}"], z[f"y_{s}"] if f"y_{s}" in keys else None)
                             for s in ("train", "val", "test")}, str(path), classes)
        multi = sorted((k for k in keys if k[1:].isdigit() and k[0] == "x"), key=lambda k: int(k[1:]))
        if "x" not in keys and not multi:
            raise PipelineError(f"{path} has no array 'x' (found: {', '.join(sorted(keys))})",
                                where=str(path), hint="save inputs as x= (or x0=, x1=, ...) and labels as y=")
        inputs = (z["x"],) if "x" in keys else tuple(z[k] for k in multi)
        return split_arrays(inputs, z["y"] if "y" in keys else None, classes, str(path), fractions)
