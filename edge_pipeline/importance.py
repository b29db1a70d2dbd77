"""Channel importance for structured pruning: which channels torch-pruning removes first.

- ``l1``, ``l2``: the magnitude of the channel's weights (summed over the coupled layers of its group).
- ``bn_scale``: the BatchNorm scale of the channel (network slimming).
- ``taylor``: first-order Taylor, |w * dL/dw|, from the loss's gradients on a few batches.
- ``obd``: Optimal Brain Damage, saliency 1/2 * h * w^2 with h the diagonal of the loss's Hessian, estimated as
  the mean of each row's squared gradient (the empirical Fisher, which equals the Hessian's expectation at a
  minimum of a log-likelihood loss); torch-pruning's ``GroupHessianImportance`` sums h * w^2 over the group.
- ``entropy``: the entropy of each channel's response across inputs (Luo & Wu, "An Entropy-based Pruning
  Method for CNN Compression", 2017): the layer's output globally averaged over its spatial or token positions,
  one value per row, in a histogram over its own range; a channel that answers every input alike carries no
  information and goes first. Taken at the Conv/Linear output, before normalization and activation: the
  histogram over a channel's own range makes it blind to the channel's scale and offset.

The loss is the pruning loss against the unpruned model (``prepare`` is handed it); gradients and responses come
from the first ``batches`` batches of the train split.
"""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn

from edge_pipeline.interface import FlatModel
from edge_pipeline.training import tensors

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "obd", "entropy")


class EntropyImportance(tp.importance.GroupMagnitudeImportance):
    """Per output channel of each Conv/Linear: the entropy (nats) of its pooled response over the rows seen by
    :meth:`record`, summed over the group's layers as the magnitude criteria sum theirs."""

    def __init__(self):
        super().__init__(group_reduction="mean", normalizer="mean")
        self.entropy: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def record(self, model: nn.Module, batches) -> None:
        responses: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(mod, _args, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                pooled = out.flatten(2).mean(2) if isinstance(mod, nn.modules.conv._ConvNd) else (
                    out.flatten(1, -2).mean(1) if out.dim() > 2 else out)
                responses.setdefault(mod, []).append(pooled.float())

        layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        handles = [m.register_forward_hook(hook) for m in layers]
        try:
            for inputs in batches:
                FlatModel(model).eval()(*inputs)
        finally:
            for h in handles:
                h.remove()
        self.entropy = {m: channel_entropy(torch.cat(r)) for m, r in responses.items()}

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels) and layer in self.entropy:
                group_imp.append(self.entropy[layer][sorted(idxs)])
                group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def channel_entropy(rows: torch.Tensor) -> torch.Tensor:
    """(rows, channels) -> each channel's histogram entropy (nats), bins over the channel's own range (as many
    as the square root of the rows, at least 8); a constant channel has 0."""
    n, c = rows.shape
    bins = max(8, int(math.sqrt(n)))
    lo, hi = rows.min(0).values, rows.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    idx = ((rows - lo) / span * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(c, bins).scatter_add_(1, idx.t(), torch.ones(c, n))
    p = counts / n
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(1)
    return torch.where(hi - lo > 1e-12 * hi.abs().clamp_min(1.0), h, torch.zeros_like(h))


def criterion(name: str) -> tp.importance.Importance:
    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "bn_scale": tp.importance.BNScaleImportance,
            "taylor": tp.importance.GroupTaylorImportance,
            "obd": tp.importance.GroupHessianImportance,
            "entropy": EntropyImportance}[name]()


def _batches(data, batches: int, batch_size: int):
    for i, (inputs, y) in enumerate(data.train.batches(batch_size)):
        if i == batches:
            return
        yield tensors(inputs), (None if y is None else torch.from_numpy(y))


def prepare(name: str, imp, model: nn.Module, teacher: nn.Module, data, loss, batches: int = 4,
            batch_size: int = 64) -> None:
    """What a data-driven criterion needs before a pruning step: gradients (taylor), the empirical Fisher in each
    parameter's ``.grad`` (obd), the channels' responses (entropy); nothing for the weight-only criteria."""
    if name == "entropy":
        imp.record(model, (inputs for inputs, _ in _batches(data, batches, batch_size)))
        return
    if name not in ("taylor", "obd"):
        return
    model.zero_grad()
    model.eval()
    flat, flat_teacher = FlatModel(model), FlatModel(teacher).eval()
    fisher = {p: torch.zeros_like(p) for p in model.parameters() if p.requires_grad}
    rows = 0
    for inputs, y in _batches(data, batches, batch_size):
        with torch.no_grad():
            t_out = flat_teacher(*inputs)
        if name == "taylor":  # the batch's summed gradient
            loss(flat(*inputs), t_out, y).backward()
            continue
        for r in range(len(inputs[0])):  # obd: each row's own gradient, squared
            model.zero_grad()
            loss(flat(*[a[r:r + 1] for a in inputs]), [t[r:r + 1] for t in t_out],
                 None if y is None else y[r:r + 1]).backward()
            for p, acc in fisher.items():
                if p.grad is not None:
                    acc += p.grad ** 2
            rows += 1
    if name == "obd":
        for p, acc in fisher.items():
            p.grad = acc / max(rows, 1)
