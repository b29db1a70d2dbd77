"""Per-layer int8 error in one pass: which layers to keep in float, without an export per layer.

Each Conv/Linear layer's output is compared with its own int8 copy on the same float input: weights
per-channel symmetric int8, the input quantized per tensor with the range the representative set gives it.
That is the error the layer itself adds, and exactly what keeping it in float buys back (a float layer's
weights and input stay float). Cumulative error would blame every layer after a bad one; this does not. All
layers are measured in one forward pass over a few validation rows, with hooks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_pipeline.interface import FlatModel, unwrap

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127) * scale[:, None]
    return q.reshape(w.shape)


def _fake_quant_input(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def _int8_forward(m: nn.Module, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The layer's own forward (a subclass may pad first, as "same"-padding convs do) on the quantized input,
    with its weights swapped for their int8 copy; ``forward`` rather than a call, so no hook runs again."""
    w = m.weight.data
    m.weight.data = _fake_quant_weight(w)
    try:
        return m.forward(_fake_quant_input(x, lo, hi))
    finally:
        m.weight.data = w


@torch.no_grad()
def layer_errors(model: nn.Module, calibration: tuple[np.ndarray, ...], rows: tuple[np.ndarray, ...],
                 batch: int = 32) -> dict[str, float]:
    """SQNR in dB of each Conv/Linear layer against its own int8 copy (lower: more error), by layer name."""
    flat = model if isinstance(model, FlatModel) else FlatModel(model)
    was_training = flat.model.training
    flat.eval()
    layers = {n: m for n, m in unwrap(flat).named_modules() if isinstance(m, LAYERS) and n}
    ranges = {n: [np.inf, -np.inf] for n in layers}
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)

    def observe(name):
        def hook(_m, args, _out):
            r = ranges[name]
            r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))
        return hook

    def compare(name):
        def hook(m, args, out):
            q = _int8_forward(m, args[0], *ranges[name])
            signal[name] += float(out.double().pow(2).sum())
            noise[name] += float((out.double() - q.double()).pow(2).sum())
        return hook

    for fn, data in ((observe, calibration), (compare, rows)):
        hooks = [m.register_forward_hook(fn(n)) for n, m in layers.items()]
        try:
            for i in range(0, len(data[0]), batch):
                flat(*[torch.from_numpy(a[i:i + batch]) for a in data])
        finally:
            for h in hooks:
                h.remove()
    flat.model.train(was_training)
    return {n: float("inf") if noise[n] == 0 else float(10 * np.log10(signal[n] / noise[n] + 1e-30))
            for n in layers if signal[n] > 0}


def int8_weights_only(model: nn.Module) -> nn.Module:
    """A copy with every Conv/Linear weight per-channel int8 and activations left in float: the ceiling that
    int8 weights alone allow (per-channel scales are unchanged by BatchNorm folding, so it need not be folded)."""
    import copy

    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, LAYERS):
                m.weight.copy_(_fake_quant_weight(m.weight))
    return q
