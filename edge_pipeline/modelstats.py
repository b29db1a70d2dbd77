"""Size figures of a torch model: parameters, MACs for one example row, bytes of its weights."""

from __future__ import annotations

import numpy as np
import torch
import torch_pruning as tp
from torch import nn


def model_stats(model: nn.Module, example: tuple[np.ndarray, ...]) -> dict[str, int]:
    was_training = model.training
    model.eval()
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(a[:1])) for a in example)
    _count_subclasses(model)
    macs, params = tp.utils.count_ops_and_params(model, inputs)
    model.train(was_training)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": int(params), "macs": int(macs), "state_bytes": int(size)}


def _count_subclasses(model: nn.Module) -> None:
    """torch-pruning's counter looks modules up by exact type, so a subclass of Conv2d (EfficientNet's
    Conv2dStaticSamePadding, a user's own) counted as zero ops: 21.0M MACs for EfficientNet-Lite0 instead of
    385M. Each subclass is counted as its nearest counted base; torch-pruning clears this table after a count."""
    from torch_pruning.utils import op_counter

    for t in {type(m) for m in model.modules()}:
        if t in op_counter.MODULES_MAPPING:
            continue
        base = next((b for b in t.__mro__[1:] if b in op_counter.MODULES_MAPPING), None)
        if base is not None:
            op_counter.CUSTOM_MODULES_MAPPING[t] = op_counter.MODULES_MAPPING[base]
