"""Per-layer int8 error from one calibrated build: which layers to keep in float, without an export per layer.

The runtimes' own debuggers (torchao's PT2E numeric debugger, ORT's ``qdq_loss_debug``) give, for every op
of one calibrated build, the SQNR of its output against the float model's: cumulative, each op carrying all
error made before it. A layer is blamed for the noise it adds: the noise ratio at its output less the one at
its input (noise ratio = 10^(-SQNR/10); noise from independent sources adds). Ops that are not layers (the
activation or add after a conv, where the int8 output is rounded) count towards the layer that feeds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NO_ERROR_DB = 200.0  # a layer that adds no measurable noise (finite, so run.json stays plain JSON and plots draw)


def _noise(db: float) -> float:
    """Noise power over signal power, capped at 1: past 0 dB the output is noise either way, and a layer fed
    noise is not blamed for amplifying it (else the layer after a broken one would take the blame)."""
    return 0.0 if db == math.inf else min(10 ** (-db / 10), 1.0)


def blame(ops: list[tuple[str, str | None, str | None]], sqnr_db: dict[str, float]) -> dict[str, float]:
    """Own error in dB (lower: more error) per layer.

    ``ops``: in graph order, (op output name, the layer it belongs to or None, the op output it reads or None
    for a graph input); ``sqnr_db``: cumulative SQNR per op output. An op that is not a layer is charged to the
    layer whose output it reads, directly or through other such ops."""
    owner: dict[str, str | None] = {}
    at: dict[str, float] = {}  # noise ratio at each op's output (an op not logged passes its input's on)
    noise: dict[str, float] = {}
    for name, layer, source in ops:
        owner[name] = layer or owner.get(source)
        before = at.get(source, 0.0)
        at[name] = _noise(sqnr_db[name]) if name in sqnr_db else before
        if owner[name] is not None and name in sqnr_db:
            noise[owner[name]] = noise.get(owner[name], 0.0) + max(at[name] - before, 0.0)
    return {layer: NO_ERROR_DB if n <= 10 ** (-NO_ERROR_DB / 10) else -10 * math.log10(n)
            for layer, n in noise.items()}


def noise_shares(errors_db: dict[str, float]) -> dict[str, float]:
    """Each layer's share of the int8 noise all layers add (own noise ratios, which add up)."""
    noise = {k: _noise(v) for k, v in errors_db.items()}
    total = sum(noise.values())
    return {k: (n / total if total else 0.0) for k, n in noise.items()}


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127) * scale[:, None]
    return q.reshape(w.shape)


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
