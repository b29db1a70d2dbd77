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
    macs, params = tp.utils.count_ops_and_params(model, inputs)
    model.train(was_training)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": int(params), "macs": int(macs), "state_bytes": int(size)}
