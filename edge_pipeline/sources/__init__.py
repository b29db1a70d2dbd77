"""Where models and data come from.

Model sources: ``zoo:NAME`` (an architecture from :mod:`.zoo`, trained by the pipeline's teacher stage) and
``package.module:callable`` (a user's function returning a trained ``nn.Module``).
Data sources: ``zoo:digits``/``zoo:digits32``, an ``.npz`` file, an image folder, or
``package.module:callable`` returning :class:`Splits`, ``(x, y)`` arrays (x may be a tuple of arrays, y None),
a torch ``Dataset`` or ``DataLoader`` (streamed, split here), or a dict of ``train``/``val``/``test`` splits.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edge_pipeline.errors import PipelineError
from edge_pipeline.sources.data import (
    DATA_ZOO,
    SPLIT_FRACTIONS,
    Split,
    Splits,
    load_npz,
    presplit,
    split_arrays,
    split_dataset,
)

# Names only, so that validating a recipe does not import torch (zoo.MODEL_ZOO holds the classes).
ZOO_MODELS = ("digits-cnn", "mobilenetv2-tiny", "resnet-tiny", "efficientnet-lite0")

__all__ = [
    "Split",
    "Splits",
    "build_model",
    "check_data_source",
    "check_model_source",
    "is_zoo",
    "load_data",
]


def is_zoo(source: str) -> bool:
    return source.startswith("zoo:")


def _split_callable(source: str, where: str) -> tuple[str, str]:
    mod, _, attr = source.partition(":")
    if not mod or not attr or not all(p.isidentifier() for p in mod.split(".") + attr.split(".")):
        raise PipelineError(f"'{source}' is not a source I know", where=where,
                            hint="use zoo:NAME, a file path, or package.module:callable")
    return mod, attr


def _import_callable(source: str, where: str):
    mod_name, attr = _split_callable(source, where)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise PipelineError(f"cannot import module '{mod_name}': {e}", where=where,
                            hint="check the module is installed or on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PipelineError(f"module '{mod_name}' has no attribute '{attr}'", where=where)
        obj = getattr(obj, part)
    if not callable(obj):
        raise PipelineError(f"'{source}' is not callable", where=where)
    return obj


def call_user(source: str, where: str):
    """Call a user's ``package.module:callable`` (a model or a data source). What it raises is the user's error,
    reported as bad input (exit 2) naming the callable and its message, not as an internal failure."""
    fn = _import_callable(source, where)
    try:
        return fn()
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code failing is bad input, said plainly
        raise PipelineError(f"'{source}' raised {type(e).__name__}: {e}", where=where,
                            hint="the error is inside that callable: run it alone to see the traceback") from None


def check_model_source(source: str, where: str) -> None:
    if is_zoo(source):
        name = source[4:]
        if name not in ZOO_MODELS:
            raise PipelineError(f"no model '{name}' in the zoo", where=where,
                                hint=f"zoo models: {', '.join(ZOO_MODELS)}")
        return
    _import_callable(source, where)


def build_model(source: str, num_classes: int | None, in_channels: int, width: float = 1.0,
                where: str = "model"):
    """A fresh ``nn.Module`` from its source; zoo models are sized to the data (classes, input channels)."""
    from torch import nn

    from edge_pipeline.sources.zoo import MODEL_ZOO

    if is_zoo(source):
        check_model_source(source, where)
        return MODEL_ZOO[source[4:]](num_classes=num_classes or 10, in_channels=in_channels, width=width)
    if width != 1.0:
        raise PipelineError("a width multiplier only applies to zoo models", where=where)
    model = call_user(source, where)
    if not isinstance(model, nn.Module):
        raise PipelineError(f"'{source}' returned {type(model).__name__}, not a torch.nn.Module", where=where)
    return model


def check_data_source(source: str, where: str) -> None:
    if is_zoo(source):
        if source[4:] not in DATA_ZOO:
            raise PipelineError(f"no data set '{source[4:]}' in the zoo", where=where,
                                hint=f"zoo data sets: {', '.join(sorted(DATA_ZOO))}")
        return
    path = Path(source)
    if source.endswith(".npz") or "/" in source or path.exists():
        if not path.exists():
            raise PipelineError(f"data file or folder not found: {source}", where=where)
        if path.is_file() and path.suffix != ".npz":
            raise PipelineError(f"data file {source} is not an .npz", where=where,
                                hint="use an .npz with x and y arrays, or a folder of class sub-folders")
        return
    _import_callable(source, where)


def load_data(source: str, where: str = "data", preprocess: dict | None = None, labels: dict | None = None,
              fractions=SPLIT_FRACTIONS) -> Splits:
    """The data a recipe names, checked (labels, NaN/Inf, lengths, sizes) and split (``fractions``: train and
    val shares where the data is split here). ``labels`` (classes, pattern) applies to image folders."""
    check_data_source(source, where)
    if is_zoo(source):
        return DATA_ZOO[source[4:]]()
    path = Path(source)
    if path.is_file():
        return load_npz(path, fractions)
    if path.is_dir():
        from edge_pipeline.sources.images import load_image_folder

        return load_image_folder(path, preprocess, labels, fractions)
    if labels and any(labels.values()):
        raise PipelineError("labels.classes and labels.pattern apply to an image folder", where=where,
                            hint=f"'{source}' is a callable: give its Dataset a classes list instead")
    out = call_user(source, where)
    if isinstance(out, Splits):
        return out
    if isinstance(out, dict):
        return presplit(out, source)
    if isinstance(out, tuple) and len(out) == 2:
        return split_arrays(out[0], out[1], None, source, fractions)
    dataset = getattr(out, "dataset", out)  # a DataLoader streams its dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return split_dataset(dataset, source, getattr(dataset, "classes", None), fractions=fractions)
    raise PipelineError(f"'{source}' returned {type(out).__name__}", where=where,
                        hint="return Splits, (x, y) arrays, a torch Dataset or DataLoader, or a dict of "
                             "train/val/test")
