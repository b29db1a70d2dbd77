"""Weight clustering (non-linear quantization by k-means, as Deep Compression does it).

Each clustered layer's weights are split by 1-D k-means into 2^b centres; every weight is replaced by its
nearest centre and the layer computes with the centres (``Codebook``, a parametrization: the weight is
``centres[indices]``, so a fine-tune's gradient reaching a centre is the sum over the weights that share it).
``bake`` turns the codebook back into a dense weight holding at most 2^b distinct values, which is what every
runtime here executes.

BatchNorm is folded into the convolution before clustering and left as an exact identity (weight 1, bias 0,
mean 0, variance 1 - eps): each runtime folds BatchNorm into the conv's weights per output channel, which would
turn one codebook into one per channel in the shipped file. Folded first, the file holds the codebook itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_pipeline.errors import PipelineError

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
INITS = ("density", "linear", "random")


def kmeans_1d(values: torch.Tensor, k: int, init: str = "density", iterations: int = 30,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (k,), index of each value's centre): Lloyd's iterations in one dimension, where the nearest
    centre is found by the midpoints between sorted centres. ``init``: ``density`` (quantiles: centres where
    the weights are dense, each holding about as many), ``linear`` (evenly spaced between the smallest and
    largest value: Deep Compression's choice, which keeps the rare large weights), ``random`` (k distinct
    weights, seeded). A centre left without weights keeps its place."""
    v = values.detach().reshape(-1).double()
    if init == "linear":
        centres = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    elif init == "density":
        centres = torch.quantile(v, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    elif init == "random":
        gen = torch.Generator().manual_seed(seed)
        centres = v[torch.randperm(len(v), generator=gen)[:k]]
    else:
        raise ValueError(f"unknown k-means initialisation '{init}' (one of {', '.join(INITS)})")
    centres = torch.sort(centres).values
    idx = torch.zeros(len(v), dtype=torch.long)
    for _ in range(iterations):
        new_idx = torch.searchsorted((centres[1:] + centres[:-1]) / 2, v)
        counts = torch.bincount(new_idx, minlength=len(centres)).double()
        sums = torch.zeros(len(centres), dtype=torch.float64).index_add_(0, new_idx, v)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        done = torch.equal(new_idx, idx) and torch.equal(moved, centres)
        idx, centres = new_idx, moved
        order = torch.argsort(centres)  # means of sorted, disjoint intervals stay sorted; kept exact anyway
        if not torch.equal(order, torch.arange(len(centres))):
            centres, idx = centres[order], torch.argsort(order)[idx]
        if done:
            break
    return centres.float(), idx.reshape(values.shape)


class Codebook(nn.Module):
    """A parametrization: the layer's weight is ``centres[indices]`` (the original weight is not used)."""

    def __init__(self, centres: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        self.centres = nn.Parameter(centres.clone())
        self.register_buffer("indices", indices.to(torch.uint8 if len(centres) <= 256 else torch.int32))

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return self.centres[self.indices.long()]


def linear_codebook(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` quantized weight-only, linearly, per output channel, symmetric to ``bits`` bits (2^b - 1 levels):
    what k-means is compared with at the same b."""
    flat = w.reshape(w.shape[0], -1)
    top = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(1).clamp(min=1e-12) / top
    return (torch.clamp(torch.round(flat / scale[:, None]), -top, top) * scale[:, None]).reshape(w.shape)


def graph_facts(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[list[tuple[str, str]], list[str]]:
    """(conv -> BatchNorm pairs where the BatchNorm is the conv output's only reader, the layers whose outputs
    are the model's outputs), by module path, from one ``torch.export`` of the model."""
    from edge_pipeline.backends.pt2e import module_path, output_layers
    from edge_pipeline.interface import FlatModel

    gm = torch.export.export(FlatModel(model).eval(), example).module()

    def path(n) -> str | None:
        found = module_path(n)
        return found.removeprefix("model.") if found else None

    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or "batch_norm" not in str(n.target):
            continue
        conv = n.args[0]
        if isinstance(conv, torch.fx.Node) and str(conv.target).startswith("aten.conv") and len(conv.users) == 1:
            c, b = path(conv), path(n)
            if c and b:
                pairs.append((c, b))
    return pairs, [p.removeprefix("model.") for p in output_layers(gm)]


@torch.no_grad()
def fold_batch_norms(model: nn.Module, pairs: list[tuple[str, str]]) -> list[str]:
    """Each (conv, BatchNorm) pair: the BatchNorm's affine map moved into the conv (weight and bias), the
    BatchNorm set to the identity. Returns the convs folded. The model must stay in eval mode for BatchNorm."""
    mods = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        if not isinstance(conv, LAYERS[:3]) or not isinstance(bn, nn.modules.batchnorm._BatchNorm) \
                or bn.running_var is None or conv.weight.shape[0] != bn.num_features:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        conv.weight.mul_(scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        new_bias = bias * scale + shift
        # The BatchNorm becomes x + kept (variance 1 - eps, mean 0, scale 1): kept is 0 where the conv takes the
        # bias, else the whole bias (a conv built without one keeps none; it stays one value per channel).
        kept = torch.zeros_like(new_bias) if conv.bias is not None else new_bias
        if conv.bias is not None:
            conv.bias.copy_(new_bias)
        bn.running_var.fill_(1 - bn.eps)
        if bn.affine:
            bn.running_mean.zero_()
            bn.weight.fill_(1)
            bn.bias.copy_(kept)
        else:
            bn.running_mean.copy_(-kept)
        for p in bn.parameters():
            p.requires_grad_(False)
        folded.append(conv_name)
    return folded


def clusterable(model: nn.Module, skip: list[str], heads: list[str], keep_head: bool, where: str) -> list[str]:
    """The Conv/Linear layers to cluster: every one, less those named in ``skip`` (and everything under them;
    an unknown name is an error) and, with ``keep_head``, the layers that make the outputs."""
    mods = dict(model.named_modules())
    for i, name in enumerate(skip):
        if name not in mods:
            layers = [n for n, m in mods.items() if isinstance(m, LAYERS)]
            raise PipelineError(f"no layer '{name}' in the model", where=f"{where}: cluster.skip[{i}]",
                                hint=f"layers: {', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")
    skipped = {n for s in skip for n in mods if n == s or n.startswith(s + ".")}
    if keep_head:
        skipped |= set(heads)
    return [n for n, m in mods.items() if isinstance(m, LAYERS) and n not in skipped]


def cluster(model: nn.Module, layer_bits: dict[str, int], init: str, iterations: int, seed: int) -> dict[str, dict]:
    """Each named layer's weight replaced by a codebook parametrization of 2^b k-means centres. Returns per
    layer: bits, centres used, and the weights' mean squared error against the original."""
    mods = dict(model.named_modules())
    out = {}
    for name, bits in layer_bits.items():
        layer = mods[name]
        w = layer.weight.detach()
        centres, idx = kmeans_1d(w, 2 ** bits, init, iterations, seed)
        parametrize.register_parametrization(layer, "weight", Codebook(centres, idx), unsafe=True)
        used = int(torch.unique(idx).numel())
        err = float(((centres[idx] - w) ** 2).mean() / (w ** 2).mean().clamp_min(1e-30))
        out[name] = {"bits": bits, "centres_used": used, "relative_mse": err}
    return out


def bake(model: nn.Module) -> None:
    """Codebooks back to dense weights (at most 2^b distinct values each): the model every exporter takes."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def centre_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What a fine-tune of a clustered model trains: every parameter that takes part in the forward pass (the
    codebooks' centres, biases, unclustered layers), not the parametrized layers' unused original weights nor
    a folded BatchNorm's identity."""
    return [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".original")]


def distinct_per_layer(weights: dict[str, np.ndarray]) -> dict[str, int]:
    """Distinct values of each weight tensor (read back from an artifact, or from a model)."""
    return {k: int(np.unique(np.asarray(v)).size) for k, v in weights.items()}


def bits_needed(distinct: int) -> int:
    return max(1, math.ceil(math.log2(max(distinct, 1))))
