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


def combined_db(errors_db: dict[str, float]) -> float:
    """The SQNR (dB) these layers' own noise makes together (noise ratios of independent sources add)."""
    total = sum(_noise(v) for v in errors_db.values())
    return math.inf if total == 0 else -10 * math.log10(total)


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


def _fake_quant_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-tensor asymmetric int8 over [lo, hi] (zero kept exact), as the runtimes quantize activations."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zero = round(-lo / scale) - 128
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


@torch.no_grad()
def output_sensitivity(model: nn.Module, calibration: tuple, rows: tuple, batch: int = 32) -> dict[str, float]:
    """Per Conv/Linear layer: the SQNR (dB) of the model's outputs over ``rows`` when that layer alone is int8
    (weights per channel, its input per tensor over the range seen on the calibration rows), the rest float.

    The runtimes' debuggers (:func:`blame`) say where int8 noise is made; this says what it does to the outputs.
    They differ where a network amplifies early noise: a briefly trained MobileNetV3's stem conv makes little
    noise of its own, yet alone it takes the outputs to 27 dB. The float fallback tries layers in this order.
    Costs one float pass over the calibration rows and one over ``rows`` per layer (no export)."""
    from edge_pipeline.interface import unwrap

    def run(arrays) -> list[torch.Tensor]:
        outs = []
        for i in range(0, len(arrays[0]), batch):
            out = model(*[torch.from_numpy(a[i:i + batch]) for a in arrays])
            outs.append(torch.cat([o.float().reshape(len(o), -1) for o in (out if isinstance(out, tuple) else (out,))],
                                  1))
        return outs

    layers = {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LAYERS) and n}
    ranges: dict[str, list[float]] = {}

    def record(name):
        def hook(_mod, args):
            lo, hi = float(args[0].min()), float(args[0].max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        run(calibration)
    finally:
        for h in handles:
            h.remove()
    ref = torch.cat(run(rows))
    power = float((ref ** 2).sum())
    out: dict[str, float] = {}
    for name, layer in layers.items():
        if name not in ranges:
            continue  # not reached on these inputs
        lo, hi = ranges[name]
        weight = layer.weight.data
        layer.weight.data = _fake_quant_weight(weight)
        handle = layer.register_forward_pre_hook(lambda _m, args, lo=lo, hi=hi: (
            _fake_quant_activation(args[0], lo, hi), *args[1:]))
        try:
            noise = float(((torch.cat(run(rows)) - ref) ** 2).sum())
        finally:
            handle.remove()
            layer.weight.data = weight
        out[name] = NO_ERROR_DB if noise <= power * 10 ** (-NO_ERROR_DB / 10) else 10 * math.log10(power / noise)
    model.train(was_training)
    return out


@torch.no_grad()
def feed_with_input_hooks(model: nn.Module, calibration: tuple, hooks: dict, batch: int) -> None:
    """The model in eval mode over the representative set (a tuple of arrays, one row per sample) in batches, with
    ``hooks[module](module, args)`` called on each module's inputs; hooks and training mode restored after."""
    handles = [m.register_forward_pre_hook(hook) for m, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calibration[0]), batch):
            model(*[torch.from_numpy(a[i:i + batch]) for a in calibration])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@torch.no_grad()
def row_range_spread(model: nn.Module, calibration: tuple, batch: int = 32) -> tuple[str, float] | None:
    """The Conv/Linear input whose representative rows need int8 ranges furthest apart, and how far: the largest
    |x| over all rows (what one static range per tensor must hold) over the median row's own largest |x| (what
    that row uses of it). At a spread of 16 the median row is quantized on a sixteenth of the steps.

    A static range cannot serve such a tensor however calibrated; a scale per row, computed at run time, can.
    Layers whose median row is all zero are left out: zeros are exact in int8 at any range."""
    from edge_pipeline.interface import unwrap

    peaks: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(_mod, args):
            x = args[0].detach()
            peaks.setdefault(name, []).append(x.reshape(len(x), -1).abs().amax(1).double())
        return hook

    feed_with_input_hooks(model, calibration, {m: record(n) for n, m in unwrap(model).named_modules()
                                               if isinstance(m, LAYERS) and n}, batch)
    spreads = {}
    for name, rows in peaks.items():
        per_row = torch.cat(rows)
        median = float(per_row.median())
        if median > 0:
            spreads[name] = float(per_row.max()) / median
    return max(spreads.items(), key=lambda kv: kv[1]) if spreads else None
