"""Saving and loading models between stages without pickled code.

A model file is a plain tensor ``state_dict`` (loaded with ``weights_only=True``) plus a JSON sidecar naming
the source architecture and the shape attributes pruning changed. Loading rebuilds the source architecture,
resizes each parameter to the saved shape and loads strictly, so a file for another architecture is refused.

Only plain instance attributes are recorded and restored (what torch-pruning rewrites: ``Conv2d.out_channels``
and the like). A value a module derives from its children (timm's ``ConvNormAct.in_channels``, a read-only
property) is never set: it follows from the restored children by itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.sources import build_model

# Attributes that structured pruning rewrites and that forward() reads.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "num_heads", "head_dim", "embed_dim")


def save_model(model: nn.Module, arch: dict, path: Path) -> None:
    """Write ``path`` (.pt state_dict) and ``path.with_suffix('.json')`` (architecture + shapes)."""
    shapes = {}
    for name, mod in model.named_modules():
        own = vars(mod)
        attrs = {a: own[a] for a in SHAPE_ATTRS if isinstance(own.get(a), (int, tuple))}
        if attrs:
            shapes[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({**arch, "shapes": shapes}, indent=1))


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved model in eval mode; returns it with its architecture record."""
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise PipelineError(f"model file or its .json sidecar is missing: {path}", where=str(path))
    arch = json.loads(meta_path.read_text())
    model = build_model(arch["source"], arch.get("num_classes"), arch["in_channels"], arch.get("width", 1.0))
    state = torch.load(path, weights_only=True, map_location="cpu")
    modules = dict(model.named_modules())
    unknown = [n for n in arch.get("shapes", {}) if n not in modules]
    if unknown:
        raise PipelineError(f"{path} does not fit architecture {arch['source']}: no layer '{unknown[0]}'",
                            where=str(path), hint="the file was saved from another model")
    for name, attrs in arch.get("shapes", {}).items():
        own = vars(modules[name])
        for k, v in attrs.items():
            if k in own:  # an instance attribute, as recorded; never a property of the user's class
                own[k] = tuple(v) if isinstance(v, list) else v
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in own:
            raise PipelineError(f"{path} does not fit architecture {arch['source']}: unexpected tensor '{key}'",
                                where=str(path), hint="the file was saved from another model")
        mod_name, _, leaf = key.rpartition(".")
        mod = modules[mod_name]
        if leaf in mod._parameters and mod._parameters[leaf] is not None:
            mod._parameters[leaf] = nn.Parameter(torch.empty_like(tensor), requires_grad=True)
        elif leaf in mod._buffers and mod._buffers[leaf] is not None:
            mod._buffers[leaf] = torch.empty_like(tensor)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{path} does not fit architecture {arch['source']}: {e}", where=str(path)) from None
    return model.eval(), arch
