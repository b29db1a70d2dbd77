"""The prune stage: structured pruning with torch-pruning's dependency graph, so tensors really shrink.

Residual adds, concatenations, depthwise convs and batch norms are kept consistent by the graph. A target is
a channel ratio or a budget (``max_macs``/``max_params``: a fraction of the teacher when <= 1, else absolute),
reached over ``iterative_steps`` with a short fine-tune after each. Unstructured and 2:4 sparsity are options
that zero weights in place: they shrink nothing on the CPU runtimes unless the file is compressed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from edge_pipeline import importance, progress
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator
from edge_pipeline.modelio import save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import PruneConfig
from edge_pipeline.sources import Splits
from edge_pipeline.stages import Stage
from edge_pipeline.training import seed_everything

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SEARCH_RESOLUTION = 100  # a budget is searched in this many small pruning steps
SCAN_TOLERANCE = 0.02  # sensitivity scan: a layer's cap is the largest ratio costing at most this much accuracy


@dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    params: tuple[int, int]
    macs: tuple[int, int]
    val_metric: dict[str, float]  # the recipe's metric on val: before, pruned, finetuned
    sensitivity: dict[str, dict[str, float]] | None
    sparsity: float | None  # fraction of zero weights, for unstructured/2:4


def output_layers(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """Every layer whose output channels reach a model output, found from torch-pruning's dependency graph:
    walk back from the graph's sinks (one per output) through channel-preserving ops (adds, reshapes,
    activations) to the first parametric layers. Pruning those would change what the model returns."""
    from edge_pipeline.interface import flatten_outputs

    dg = tp.DependencyGraph().build_dependency(model, example, output_transform=lambda o: flatten_outputs(o)[1],
                                               verbose=False)
    found, seen = [], set()
    todo = [n for n in dg.module2node.values() if not n.outputs]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, nn.Module) and any(p.requires_grad for p in node.module.parameters(recurse=False)) \
                and not isinstance(node.module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            found.append(node.module)
            continue
        todo += node.inputs
    return found


def resolve_ignored(model: nn.Module, cfg: PruneConfig, where: str,
                    example: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    ignored = output_layers(model, example)
    for i, name in enumerate(cfg.ignore):
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            raise PipelineError(f"layer '{name}' in prune.ignore does not exist", where=f"{where}: prune.ignore[{i}]",
                                hint=f"layers with a similar name: {', '.join(close)}" if close else
                                "see the layer names with print(model)")
        ignored.append(modules[name])
    type_names = {type(m).__name__ for m in modules.values()}
    for i, tname in enumerate(cfg.ignore_types):
        if tname not in type_names:
            raise PipelineError(f"no layer of type '{tname}' in the model", where=f"{where}: prune.ignore_types[{i}]",
                                hint=f"types in the model: {', '.join(sorted(type_names))}")
        ignored += [m for m in modules.values() if type(m).__name__ == tname]
    return ignored


def _budget(cfg: PruneConfig, base: dict[str, int]) -> tuple[str, float] | None:
    for key, stat in (("max_macs", "macs"), ("max_params", "params")):
        v = getattr(cfg, key)
        if v is not None:
            return stat, v * base[stat] if v <= 1 else v
    return None


def sensitivity_scan(model: nn.Module, ev: Evaluator, cfg: PruneConfig, ignored: list[nn.Module],
                     example: tuple[torch.Tensor, ...], data: Splits, loss) -> dict[str, dict[str, float]]:
    """Prune each prunable layer alone at each scan ratio (no fine-tune), by the recipe's importance, and measure
    the metric's drop on val. Gradient criteria are computed once on the model (each trial copies its .grad)."""
    base = ev.score_model(model, "val")
    if cfg.importance in ("taylor", "obd"):
        importance.prepare(cfg.importance, None, model, model, data, loss, cfg.importance_batches)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = {m: n for n, m in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE) and m not in ignored
              and not (isinstance(m, nn.Conv2d) and m.groups > 1)]
    scan: dict[str, dict[str, float]] = {}
    with progress.task("sensitivity scan", total=len(layers) * len(cfg.scan_ratios)) as t:
        for layer in layers:
            name = names[layer]
            scan[name] = {}
            for r in cfg.scan_ratios:
                trial = _clone(model, state)
                tmods = dict(trial.named_modules())
                others = [tmods[names[m]] for m in model.modules() if isinstance(m, PRUNABLE) and m is not layer]
                imp = importance.criterion(cfg.importance)
                if cfg.importance == "entropy":
                    importance.prepare("entropy", imp, trial, trial, data, loss, cfg.importance_batches)
                pruner = tp.pruner.BasePruner(trial, example, importance=imp, pruning_ratio=r,
                                              ignored_layers=others, round_to=None)
                pruner.step()
                scan[name][str(r)] = ev.metric.drop(ev.score_model(trial, "val"), base) or 0.0
                t.advance()
    return scan


def _clone(model: nn.Module, state: dict) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    for src, dst in zip(model.parameters(), m.parameters(), strict=True):  # deepcopy leaves .grad behind
        if src.grad is not None:
            dst.grad = src.grad.clone()
    return m.eval()


def _caps_from_scan(model: nn.Module, scan: dict, cfg: PruneConfig) -> dict[nn.Module, float]:
    modules = dict(model.named_modules())
    caps = {}
    for name, drops in scan.items():
        ok = [float(r) for r, d in drops.items() if d <= SCAN_TOLERANCE]
        caps[modules[name]] = min(cfg.max_layer_ratio, max(ok) if ok else min(float(r) for r in drops) / 2)
    return caps


def check_config(cfg: PruneConfig, data: Splits, where: str) -> None:
    """What can be said about prune settings before any work."""
    if cfg.method != "structured":
        return
    budget = cfg.max_macs is not None or cfg.max_params is not None
    if not budget and cfg.ratio is None:
        raise PipelineError("prune needs a target: ratio, max_macs or max_params", where=f"{where}: prune",
                            hint="e.g. prune: {max_macs: 0.5}; or prune: {enabled: false} and distill: "
                                 "{enabled: false} for post-training int8 alone")
    if budget and cfg.ratio is not None:
        raise PipelineError("give either prune.ratio or a budget (max_macs/max_params), not both",
                            where=f"{where}: prune")
    if cfg.max_macs is not None and cfg.max_params is not None:
        raise PipelineError("give one budget, max_macs or max_params, not both", where=f"{where}: prune")
    if cfg.importance in ("taylor", "obd") and data.train.y is None:
        # Against the unpruned model alone the loss starts at its minimum, where every gradient is zero.
        raise PipelineError(f"{cfg.importance} importance needs labels", where=f"{where}: prune.importance",
                            hint="use l1, l2, bn_scale or entropy for unlabeled data")


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    return {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _fix_attention(model: nn.Module) -> None:
    """torch-pruning shrinks an attention layer's projections; its bookkeeping must follow."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.embed_dim = m.out_proj.in_features
            m.kdim = m.vdim = m.embed_dim
            m.head_dim = m.embed_dim // m.num_heads


def prune(model: nn.Module, data: Splits, cfg: PruneConfig, ev: Evaluator, where: str = "recipe") -> PruneResult:
    """Structured pruning (or sparsity) of ``model`` in place, fine-tuned against its own unpruned copy."""
    import copy

    from edge_pipeline.training import fit_to_teacher, loss_for

    seed_everything(cfg.seed)
    check_config(cfg, data, where)
    teacher = copy.deepcopy(model).eval()
    loss = loss_for(None, ev, alpha=0.5, temperature=4.0)
    example = tuple(torch.from_numpy(a[:1]) for a in data.example)
    base = model_stats(model, data.example)
    acc_before = ev.score_model(model, "val")
    ignored = resolve_ignored(model, cfg, where, example)
    if cfg.method != "structured":
        return _sparsify(model, teacher, data, cfg, ignored, base, acc_before, ev, loss)

    budget = _budget(cfg, base)
    scan = sensitivity_scan(model, ev, cfg, ignored, example, data, loss) if cfg.sensitivity_scan else None
    ratio_dict = _caps_from_scan(model, scan, cfg) if scan else None
    steps = cfg.iterative_steps if budget is None else SEARCH_RESOLUTION
    imp = importance.criterion(cfg.importance)
    pruner = tp.pruner.BasePruner(
        model, example, importance=imp, global_pruning=cfg.global_pruning,
        pruning_ratio=cfg.ratio if budget is None else cfg.max_layer_ratio, pruning_ratio_dict=ratio_dict,
        max_pruning_ratio=cfg.max_layer_ratio, iterative_steps=steps, ignored_layers=ignored, round_to=cfg.round_to,
        num_heads=_attention_heads(model), output_transform=_flat_outputs,
    )
    # Budget: step in small increments; fine-tune each time the next of `iterative_steps` milestones is passed.
    milestones = ([] if budget is None else
                  [base[budget[0]] * (budget[1] / base[budget[0]]) ** ((i + 1) / cfg.iterative_steps)
                   for i in range(cfg.iterative_steps)])
    acc_pruned = None
    with progress.task("pruning", total=steps) as t:
        for _ in range(steps):
            importance.prepare(cfg.importance, imp, model, teacher, data, loss, cfg.importance_batches)
            pruner.step()
            _fix_attention(model)
            t.advance()
            stats = model_stats(model, data.example)
            if budget is None:
                reached_milestone = True
            else:
                reached_milestone = bool(milestones) and stats[budget[0]] <= milestones[0]
                while milestones and stats[budget[0]] <= milestones[0]:
                    milestones.pop(0)
            if reached_milestone:
                acc_pruned = ev.score_model(model, "val")
                if cfg.finetune_epochs:
                    fit_to_teacher(model, teacher, data.train, loss, cfg.finetune_epochs, cfg.lr, cfg.seed,
                                   "fine-tuning")
            if budget is not None and not milestones:
                break
    model.zero_grad(set_to_none=True)
    after = model_stats(model, data.example)
    if budget is not None and after[budget[0]] > budget[1]:
        raise PipelineError(
            f"prune budget cannot be met: {budget[0]} {after[budget[0]]} > {int(budget[1])} with every layer "
            f"pruned to its cap ({cfg.max_layer_ratio:.0%}) and {len(ignored)} layer(s) kept whole",
            where=f"{where}: prune.max_{budget[0]}",
            hint="raise the budget, raise max_layer_ratio or ignore fewer layers")
    return PruneResult(model.eval(), (base["params"], after["params"]), (base["macs"], after["macs"]),
                       {"before": acc_before, "pruned": acc_pruned, "finetuned": ev.score_model(model, "val")},
                       scan, None)


def _flat_outputs(out):
    from edge_pipeline.interface import flatten_outputs

    return flatten_outputs(out)[1]


def _sparsify(model, teacher, data, cfg, ignored, base, acc_before, ev, loss) -> PruneResult:
    """Zero weights in place: unstructured magnitude (global) or 2:4 along the input dimension."""
    from edge_pipeline.training import fit_to_teacher

    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE) and m not in ignored]
    masks = []
    with torch.no_grad():
        if cfg.method == "unstructured":
            ratio = cfg.ratio or 0.5
            flat = torch.cat([w.abs().flatten() for w in weights])
            thresh = flat.kthvalue(max(1, int(ratio * flat.numel()))).values
            masks = [(w.abs() > thresh).float() for w in weights]
        else:  # 2:4: in each group of 4 consecutive input weights keep the 2 largest
            for w in weights:
                flat = w.reshape(w.shape[0], -1)
                if flat.shape[1] % 4:
                    masks.append(torch.ones_like(w))
                    continue
                groups = flat.abs().reshape(flat.shape[0], -1, 4)
                keep = groups.argsort(dim=-1, descending=True)[..., :2]
                m = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
                masks.append(m.reshape(w.shape))
        for w, m in zip(weights, masks, strict=False):
            w.mul_(m)
    acc_pruned = ev.score_model(model, "val")
    hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in zip(weights, masks, strict=False)]
    if cfg.finetune_epochs:
        fit_to_teacher(model, teacher, data.train, loss, cfg.finetune_epochs, cfg.lr, cfg.seed,
                       "fine-tuning (masked)")
    for h in hooks:
        h.remove()
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    after = model_stats(model, data.example)
    return PruneResult(model.eval(), (base["params"], after["params"]), (base["macs"], after["macs"]),
                       {"before": acc_before, "pruned": acc_pruned, "finetuned": ev.score_model(model, "val")},
                       None, float(zeros))


def run(ctx, out: Path) -> dict:
    teacher, arch = ctx.teacher()
    res = prune(teacher, ctx.data, ctx.recipe.prune, ctx.evaluator, where=ctx.recipe_path)
    save_model(res.model, arch, out / "model.pt")
    if res.sensitivity:
        (out / "sensitivity.json").write_text(json.dumps(res.sensitivity, indent=1))
    metrics = {
        "method": ctx.recipe.prune.method,
        "params_before": res.params[0], "params_after": res.params[1],
        "macs_before": res.macs[0], "macs_after": res.macs[1],
        "macs_fraction": res.macs[1] / res.macs[0], "params_fraction": res.params[1] / res.params[0],
        "state_bytes": model_stats(res.model, ctx.data.example)["state_bytes"], "metric": ctx.metric.name,
        "val_metric_before": res.val_metric["before"], "val_metric_pruned": res.val_metric["pruned"],
        "val_metric_finetuned": res.val_metric["finetuned"],
    }
    if res.sparsity is not None:
        metrics["weight_sparsity"] = res.sparsity
        metrics["note"] = ("unstructured/2:4 sparsity zeroes weights but keeps tensor shapes: it shrinks nothing "
                           "on the CPU runtimes unless the file is compressed")
    return metrics


def _report(folder: Path, metrics: dict, targets: dict) -> str | None:
    """The report's pruning sensitivity scan, where the run made one."""
    from edge_pipeline.plots import figure, plt

    if not (folder / "sensitivity.json").is_file():
        return None
    scan = json.loads((folder / "sensitivity.json").read_text())
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for layer, drops in scan.items():
        rs = sorted(drops, key=float)
        ax.plot([float(r) for r in rs], [drops[r] for r in rs], marker="o", label=layer)
    ax.set_xlabel("fraction of this layer's channels removed (this layer alone)")
    ax.set_ylabel("validation metric drop (fraction)")
    ax.legend(fontsize=6)
    return figure("Pruning sensitivity scan", fig)


STAGE = Stage("prune", 1, ("teacher",), lambda r: r.prune.model_dump(), lambda r: r.prune.enabled,
              check=lambda ctx: check_config(ctx.recipe.prune, ctx.data, ctx.recipe_path), produces_model=True,
              command="Structured pruning of the teacher.",
              summary_keys=("macs_fraction", "params_after", "val_metric_pruned", "val_metric_finetuned"),
              report=_report,
              card=lambda p, m: (f"- **prune** ({p['method']}): MACs {p['macs_before']} → {p['macs_after']} "
                                 f"({p['macs_fraction']:.1%}), params {p['params_before']} → {p['params_after']}."))
