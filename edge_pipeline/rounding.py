"""Weight rounding chosen on the data (AdaRound's search space, its quadratic objective): each int8 weight is
rounded up or down, whichever makes the layer's outputs on the representative set closer to float, instead of
to the nearest grid point.

Nearest rounding minimizes each weight's own error; what matters is the layer's output error ``e^T H e``
(``e`` the weight errors of one output channel, ``H`` the second moment of that channel's input patches). A
depthwise conv whose kernel sums to nearly zero over smooth images (an edge filter) turns the sum of its
rounding errors into a leak of the image itself: EfficientNet-Lite0's first depthwise conv, int8 weights alone,
took the model's outputs to 23.4 dB SQNR (it carried 46% of the model's int8 noise); rounded on the data, 33.2 dB.

The chosen values are written back as float weights on the int8 grid (``q * scale``, the channel's largest
weight kept at +-127), so each backend's own per-channel symmetric quantizer (scale = max |w| / 127) reads back
exactly these integers, BatchNorm folding included (it scales a channel's weights and its scale alike).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_pipeline.interface import flat_name
from edge_pipeline.layer_error import feed_with_input_hooks

QMAX = 127
MIN_SCALE = 2 ** -12  # the PT2E weight observers' eps: a channel under it gets another scale, so it is left alone
SWEEPS = 3
# A layer whose int8 weights leave its outputs under this SQNR on the data keeps its float weights: rounded, its
# calibrated output range would be the broken layer's (a Linear with one weight of 1e4 on an always-zero input:
# every other weight rounds to 0, the output range collapses, and XNNPACK refused the requantization scale).
MIN_SQNR_DB = 10.0
MAX_INPUTS = 2048  # a layer reading more inputs per output (C_in * kh * kw) keeps nearest rounding: H is D x D


def per_channel_grid(profile, qmax_for):
    """A backend's ``int8_weight_grid``: ``(name, module) -> qmax or None`` over the layers a profile quantizes
    per channel (all but its ``per_tensor_layers``; none where ``per_channel`` is off), each on the grid
    ``qmax_for(module)`` its backend uses."""
    if not profile.quantization.per_channel:
        return None
    per_tensor = {flat_name(name) for name in profile.quantization.per_tensor_layers}
    return lambda name, module: None if name in per_tensor else qmax_for(module)


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv's input as what each output position reads: (N, C_in * kh * kw, positions)."""
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-1)
        kernel, dilation, padding, stride = (layer.kernel_size[0], 1), (layer.dilation[0], 1), \
            (layer.padding[0], 0), (layer.stride[0], 1)
    else:
        kernel, dilation, padding, stride = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of what one output element reads: (rows, C_in * kh * kw) for a conv,
    (rows, features) for a Linear."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = _columns(layer, x)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels \
        == layer.out_channels


def roundable(layer: nn.Module) -> bool:
    """Layers whose rounding is chosen here: Linear, Conv1d/Conv2d with one group, and depthwise Conv2d with
    numeric padding (other grouped convs keep nearest rounding)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features <= MAX_INPUTS
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)) or isinstance(layer.padding, str):
        return False
    if layer.padding_mode != "zeros":
        return False
    if layer.groups == 1:
        return layer.weight[0].numel() <= MAX_INPUTS
    return depthwise(layer)


class _SecondMoment:
    """Accumulates H = sum of p p^T over the input patches a layer sees (per channel for a depthwise conv)."""

    def __init__(self, layer: nn.Module):
        self.layer, self.h = layer, None

    def __call__(self, _module, args) -> None:
        x = args[0].detach().float()
        if depthwise(self.layer):
            c, k = self.layer.in_channels, self.layer.kernel_size[0] * self.layer.kernel_size[1]
            cols = _columns(self.layer, x).reshape(x.shape[0], c, k, -1)
            h = torch.einsum("ncil,ncjl->cij", cols, cols)
        else:
            p = _patches(self.layer, x)
            h = p.T @ p
        h = h.double()
        self.h = h if self.h is None else self.h + h


def _choose(w: torch.Tensor, h: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer weights (C_out, D) in [floor(w), ceil(w)] lowering sum_c e_c^T H_c e_c from nearest rounding by
    coordinate descent (``SWEEPS`` passes over the D inputs, all channels at once). ``h``: (D, D) shared by
    the channels, or (C_out, D, D) one per channel."""
    q = torch.round(w)
    # The channel's largest weight stays at +-QMAX: the runtime's scale is read from it.
    fixed = w.abs() > qmax - 1e-6
    lo, hi = torch.where(fixed, q, torch.floor(w)), torch.where(fixed, q, torch.ceil(w))
    shared = h.dim() == 2
    g = (q - w) @ h if shared else torch.einsum("cij,cj->ci", h, q - w)  # H e, per channel
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    for _ in range(SWEEPS):
        moved = False
        for j in range(w.shape[1]):
            step = torch.where(q[:, j] == lo[:, j], hi[:, j], lo[:, j]) - q[:, j]
            gain = 2 * step * g[:, j] + step * step * (diag[j] if shared else diag[:, j])
            step = torch.where(gain < 0, step, torch.zeros_like(step))
            if not bool(step.any()):
                continue
            moved = True
            q[:, j] += step
            g += step[:, None] * (h[j][None, :] if shared else h[:, :, j])
        if not moved:
            break
    return q


def _quadratic(e: torch.Tensor, h: torch.Tensor) -> float:
    """sum over channels of e_c^T H_c e_c: a layer's squared output error (or output) on the data."""
    return float(((e @ h) * e).sum() if h.dim() == 2 else torch.einsum("ci,cij,cj->", e, h, e))


@torch.no_grad()
def second_moments(model: nn.Module, calibration: tuple[np.ndarray, ...], batch: int = 8) -> dict[str, torch.Tensor]:
    """H of every roundable layer over the representative set (the float model's inputs to it), by module path;
    a layer these inputs do not reach is left out."""
    layers = {n: m for n, m in model.named_modules() if n and roundable(m)}
    moments = {n: _SecondMoment(m) for n, m in layers.items()}
    feed_with_input_hooks(model, calibration, {m: moments[n] for n, m in layers.items()}, batch)
    return {n: m.h for n, m in moments.items() if m.h is not None}


@torch.no_grad()
def round_layer(weight: torch.Tensor, h: torch.Tensor, qmax: int = QMAX) -> torch.Tensor | None:
    """``weight`` on the symmetric per-channel grid over +-``qmax`` (127 for int8, 64 for ORT's 7-bit weights),
    rounded by its output error under ``h``; None where int8 weights break the layer however rounded."""
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    scale = flat.abs().amax(1) / qmax
    usable = scale >= MIN_SCALE
    if not bool(usable.any()):
        return None
    h_used = h if h.dim() == 2 else h[usable]
    w = flat[usable]
    q = _choose(w / scale[usable, None], h_used, qmax) * scale[usable, None]
    if _quadratic(q - w, h_used) * 10 ** (MIN_SQNR_DB / 10) > _quadratic(w, h_used):
        return None  # left as it is, for the fallback to find
    flat[usable] = q
    return flat.reshape(weight.shape).to(weight.dtype)


def rounded_weights(model: nn.Module, calibration: tuple[np.ndarray, ...], qmax: int = QMAX
                    ) -> dict[str, torch.Tensor]:
    """Every roundable layer's weight rounded on the representative set, by module path. Each layer stands alone:
    a subset of them is what rounding that subset would give."""
    layers = dict(model.named_modules())
    out = {}
    for name, h in second_moments(model, calibration).items():
        weight = round_layer(layers[name].weight, h, qmax)
        if weight is not None:
            out[name] = weight
    return out


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` carrying these weights, by module path."""
    copied = copy.deepcopy(model)
    layers = dict(copied.named_modules())
    for name, weight in weights.items():
        layer = layers[name]
        layer.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    return copied
