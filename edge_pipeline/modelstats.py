"""Size figures of a torch model: parameters, MACs for one input, bytes of its float32 weights."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def model_stats(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    model.train(was_training)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": int(params), "macs": int(macs), "state_bytes": int(size)}
