"""The model interface: named inputs and outputs, discovered once from the model and an example batch.

Every stage, backend, runner and the manifest use it. Inputs are positional, in the order of the model's
``forward`` parameters (named after them); outputs are the leaves of whatever ``forward`` returns (a tensor,
tuple, list or dict, nested or not), named after their path: ``output`` for a lone tensor, ``0``/``1`` for a
tuple, ``boxes`` for a dict key, ``heads.0`` for nested ones.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from edge_pipeline.errors import PipelineError

# Input dtypes every backend takes (int64 token ids become int32 in LiteRT; the runner casts).
SUPPORTED_INPUT_DTYPES = ("float32", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: str  # numpy dtype name


@dataclass(frozen=True)
class ModelInterface:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def to_dict(self) -> dict:
        return {"inputs": [asdict(s) for s in self.inputs], "outputs": [asdict(s) for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> ModelInterface:
        def specs(rows):
            return tuple(TensorSpec(r["name"], tuple(r["shape"]), r["dtype"]) for r in rows)
        return cls(specs(d["inputs"]), specs(d["outputs"]))


def _leaf_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts) or "output"


def flatten_outputs(out, where: str = "model output") -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a model's output leaves; anything but tensors is refused, naming the leaf."""
    from torch.utils._pytree import tree_flatten_with_path

    leaves, _ = tree_flatten_with_path(out)
    names, tensors = [], []
    for path, leaf in leaves:
        name = _leaf_name(path)
        if not isinstance(leaf, torch.Tensor):
            raise PipelineError(f"model output '{name}' is a {type(leaf).__name__}, not a tensor", where=where,
                                hint="return tensors (alone, or in a tuple, list or dict); wrap the model so "
                                     "forward() returns only tensors")
        names.append(name)
        tensors.append(leaf)
    if not tensors:
        raise PipelineError("the model returned no tensors", where=where)
    return names, tensors


class FlatModel(nn.Module):
    """The model with its outputs flattened to a tuple of tensors: what every backend exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return tuple(flatten_outputs(self.model(*inputs))[1])


def flat_name(layer: str) -> str:
    """A user's layer name as a module path inside :class:`FlatModel` (what exported graphs record)."""
    return f"model.{layer}" if layer else "model"


def unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, FlatModel) else model


def positional_parameters(model: nn.Module) -> list[str] | None:
    """The names of the parameters ``forward`` takes by position, or None where its signature cannot be read."""
    try:
        params = inspect.signature(unwrap(model).forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def parameter_names(model: nn.Module, n: int) -> list[str]:
    """Names for n positional inputs: forward's parameter names, else input_<i>."""
    names = (positional_parameters(model) or [])[:n]
    return names + [f"input_{i}" for i in range(len(names), n)]


def bind_inputs(model: nn.Module, names: list[str], where: str = "data") -> list[str]:
    """Named data items (a tokenizer's dict, a Dataset's dict) go to ``forward``'s parameters by name, whatever
    the keys' order: returns the names in the order ``forward`` takes them by position. A key ``forward`` does
    not take is refused, naming it; so is a gap (a parameter before the last given one that the data lacks),
    since every exported model takes its inputs by position."""
    order = positional_parameters(model)
    if order is None:
        return names
    shown = f"forward({', '.join(order)})"
    unknown = [n for n in names if n not in order]
    if unknown:
        raise PipelineError(f"data key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                            f"{'are' if len(unknown) > 1 else 'is'} not a parameter of the model's {shown}",
                            where=where, hint="rename the keys after forward's parameters, or drop them from the "
                                              "items the data source yields")
    bound = sorted(names, key=order.index)
    missing = [p for p in order[:order.index(bound[-1])] if p not in names]
    if missing:
        raise PipelineError(f"the data gives {', '.join(map(repr, bound))} but not {', '.join(map(repr, missing))}, "
                            f"which comes before them in {shown}", where=where,
                            hint="exported models take inputs by position: give those keys too (e.g. an "
                                 "all-ones attention mask), or wrap the model so forward takes only what the data has")
    return bound


def discover(model: nn.Module, example: tuple[np.ndarray, ...], names: list[str] | None = None,
             where: str = "model") -> ModelInterface:
    """Run the model once on an example batch (rows >= 1) and record its inputs and outputs."""
    for i, x in enumerate(example):
        if x.dtype.name not in SUPPORTED_INPUT_DTYPES:
            raise PipelineError(f"input {i} has dtype {x.dtype.name}, which the backends do not take",
                                where=where, hint=f"give inputs as one of {', '.join(SUPPORTED_INPUT_DTYPES)}")
    names = names or parameter_names(model, len(example))
    was_training = unwrap(model).training
    model.eval()
    try:
        with torch.no_grad():
            out = unwrap(model)(*[torch.from_numpy(np.ascontiguousarray(x)) for x in example])
    except Exception as e:  # noqa: BLE001 - a user model failing on its own data is bad input, said plainly
        shapes = ", ".join(f"{n}: {tuple(x.shape)} {x.dtype}" for n, x in zip(names, example, strict=True))
        raise PipelineError(f"the model fails on an example batch ({shapes}): {type(e).__name__}: {e}",
                            where=where, hint="check the data's shapes and dtypes match what forward() takes, "
                                              "inputs in the order of forward's parameters") from None
    finally:
        unwrap(model).train(was_training)
    out_names, tensors = flatten_outputs(out, where=f"{where}: output")
    rows = len(example[0])
    for n, t in zip(out_names, tensors, strict=True):
        if t.dim() == 0 or t.shape[0] != rows:
            raise PipelineError(f"model output '{n}' has shape {tuple(t.shape)}: no batch dimension of {rows}",
                                where=f"{where}: output", hint="every output must keep the batch dimension first")
    ins = tuple(TensorSpec(n, tuple(x.shape[1:]), x.dtype.name) for n, x in zip(names, example, strict=True))
    outs = tuple(TensorSpec(n, tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""))
                 for n, t in zip(out_names, tensors, strict=True))
    return ModelInterface(ins, outs)
