"""The distill stage: distill the teacher into a small student.

Loss: ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels)`` (soft targets only for
unlabeled data), plus an optional hint loss between named layers through a learned 1x1 projection.
AdamW with warm-up and cosine decay, evaluation each epoch, early stopping, best checkpoint kept, and a
per-epoch checkpoint to resume from after a kill. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edge_pipeline import distributed
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator, agreement, predict
from edge_pipeline.interface import FlatModel, ModelInterface
from edge_pipeline.modelio import load_model, save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import DistillConfig, Recipe
from edge_pipeline.sources import Splits, build_model, is_zoo
from edge_pipeline.stages import Stage, fmt_metric
from edge_pipeline.training import fit_against_teacher, loss_for, pick_device, seed_everything


@dataclass(frozen=True)
class DistillResult:
    model: nn.Module
    arch: dict
    curves: list[dict]  # per epoch: train_loss, val_loss, val_metric, val_cosine
    best_epoch: int


class _Hints(nn.Module):
    """Captures named layers' outputs and maps student features to the teacher's width (1x1 conv/linear)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs, example: torch.Tensor, where: str):
        super().__init__()
        smods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
        self.feats: dict[str, torch.Tensor] = {}
        self.pairs = list(pairs)
        for i, (s, t) in enumerate(self.pairs):
            for name, mods, side in ((s, smods, "student"), (t, tmods, "teacher")):
                if not name or name not in mods:
                    raise PipelineError(f"hint layer '{name}' does not exist in the {side}",
                                        where=f"{where}: distill.hint_layers[{i}]",
                                        hint="name layers as in model.named_modules()")
            smods[s].register_forward_hook(self._keep(f"s{i}"))
            tmods[t].register_forward_hook(self._keep(f"t{i}"))
        with torch.no_grad():
            student.eval()(*example)
            teacher.eval()(*example)
        proj = []
        for i in range(len(self.pairs)):
            fs, ft = self.feats[f"s{i}"], self.feats[f"t{i}"]
            if fs.dim() == 4:
                if fs.shape[2:] != ft.shape[2:]:
                    raise PipelineError(f"hint layers {self.pairs[i]} have different spatial sizes "
                                        f"{tuple(fs.shape[2:])} and {tuple(ft.shape[2:])}",
                                        where=f"{where}: distill.hint_layers[{i}]")
                proj.append(nn.Conv2d(fs.shape[1], ft.shape[1], 1))
            else:
                proj.append(nn.Linear(fs.shape[-1], ft.shape[-1]))
        self.proj = nn.ModuleList(proj)

    def _keep(self, key):
        def hook(_m, _i, out):
            self.feats[key] = out
        return hook

    def loss(self) -> torch.Tensor:
        return sum(F.mse_loss(p(self.feats[f"s{i}"]), self.feats[f"t{i}"].detach())
                   for i, p in enumerate(self.proj))


def check_config(recipe: Recipe, iface: ModelInterface, data: Splits, where: str) -> None:
    """What can be said about distill settings before any work: the student spec and the outputs named."""
    cfg = recipe.distill
    if cfg.student == "pruned" and not recipe.prune.enabled:
        raise PipelineError("distill.student is 'pruned' but the prune stage is disabled",
                            where=f"{where}: distill.student",
                            hint="enable prune, or set distill.student to teacher@0.5 or a model source")
    if cfg.student.startswith("teacher@"):
        try:
            width = float(cfg.student.split("@", 1)[1])
        except ValueError:
            raise PipelineError(f"bad width in '{cfg.student}'", where=f"{where}: distill.student",
                                hint="use teacher@0.5") from None
        if not 0 < width <= 1:
            raise PipelineError(f"width {width} in '{cfg.student}' is not in (0, 1]", where=f"{where}: distill.student")
        if not is_zoo(recipe.model):
            raise PipelineError("teacher@WIDTH only narrows zoo models", where=f"{where}: distill.student",
                                hint="use student: pruned, or give the student as package.module:callable")
    for i, name in enumerate(cfg.logit_outputs or []):
        if name not in iface.output_names:
            raise PipelineError(f"'{name}' is not an output of the model", where=f"{where}: distill.logit_outputs[{i}]",
                                hint=f"outputs: {', '.join(iface.output_names)}")


def make_student(cfg: DistillConfig, teacher_arch: dict, pruned_dir: Path | None, data: Splits, where: str):
    if cfg.student == "pruned":
        if pruned_dir is None:
            raise PipelineError("distill.student is 'pruned' but the prune stage is disabled", where=where,
                                hint="enable prune, or set distill.student to teacher@0.5 or a model source")
        return load_model(pruned_dir / "model.pt")
    if cfg.student.startswith("teacher@"):
        arch = {**teacher_arch, "width": float(cfg.student.split("@", 1)[1])}
    else:
        arch = {"source": cfg.student, "num_classes": data.num_classes, "in_channels": data.input_shape[0],
                "width": 1.0}
    model = build_model(arch["source"], arch["num_classes"], arch["in_channels"], arch["width"],
                        where=f"{where}: distill.student")
    return model, arch


def distill(teacher: nn.Module, student: nn.Module, arch: dict, data: Splits, cfg: DistillConfig, ev: Evaluator,
            where: str = "recipe", resume: Path | None = None) -> DistillResult:
    device = pick_device(cfg.device, f"{where}: distill.device")
    distributed.init(device)
    seed_everything(cfg.seed)
    example = tuple(torch.from_numpy(a) for a in data.example)
    with torch.no_grad():
        t_out, s_out = FlatModel(teacher).eval()(*example), FlatModel(student).eval()(*example)
    for name, a, b in zip(ev.names, t_out, s_out, strict=False):
        if a.shape != b.shape:
            raise PipelineError(f"student output '{name}' has shape {tuple(b.shape[1:])}, the teacher's "
                                f"{tuple(a.shape[1:])}", where=f"{where}: distill.student",
                                hint="the student must give the same outputs as the teacher")
    if len(t_out) != len(s_out):
        raise PipelineError(f"student gives {len(s_out)} outputs, the teacher {len(t_out)}",
                            where=f"{where}: distill.student")
    hints = _Hints(student, teacher, cfg.hint_layers, example, where) if cfg.hint_layers else None
    if device == "cuda" and distributed.world_size() > 1:
        torch.cuda.set_device(distributed.rank() % torch.cuda.device_count())
    teacher.to(device).eval()
    student.to(device)
    params = list(student.parameters()) + (list(hints.proj.parameters()) if hints else [])
    if hints:
        hints.to(device)
    forward: nn.Module = FlatModel(student)
    if distributed.world_size() > 1:
        forward = nn.parallel.DistributedDataParallel(forward)
    fit = fit_against_teacher(
        student, forward, teacher, data, loss_for(cfg, ev), ev, params=params, epochs=cfg.epochs, lr=cfg.lr,
        weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, warmup_epochs=cfg.warmup_epochs, seed=cfg.seed,
        device=device, description="distill", resume=resume, patience=cfg.patience,
        extra_loss=(lambda: cfg.hint_weight * hints.loss()) if hints else None,
        extra_state=hints.proj if hints else None, val_outputs=lambda: predict(student, data.val, device=device))
    student.load_state_dict(fit.best)
    return DistillResult(student.cpu().eval(), arch, fit.curves, fit.best_epoch)


def run(ctx, out: Path) -> dict:
    teacher, teacher_arch = ctx.teacher()
    cfg = ctx.recipe.distill
    ev = ctx.evaluator
    student, arch = make_student(cfg, teacher_arch, ctx.stage_dir("prune"), ctx.data, ctx.recipe_path)
    resume = ctx.store.dir / f".distill-resume-{ctx.keys['distill'][:16]}.pt"
    res = distill(teacher, student, arch, ctx.data, cfg, ev, where=ctx.recipe_path, resume=resume)
    save_model(res.model, res.arch, out / "model.pt")
    (out / "curves.json").write_text(json.dumps(res.curves, indent=1))
    if distributed.is_main():
        resume.unlink(missing_ok=True)
    stats = model_stats(res.model, ctx.data.example)
    t_stats = ctx.metrics["teacher"]
    s_test = predict(res.model, ctx.data.test)
    metrics = {**stats, "macs_fraction_of_teacher": stats["macs"] / t_stats["macs"],
               "params_fraction_of_teacher": stats["params"] / t_stats["params"],
               "best_epoch": res.best_epoch, "epochs_run": len(res.curves), "world_size": distributed.world_size(),
               "metric": ev.metric.name, "val_metric": curves_best(res.curves, res.best_epoch),
               "test_metric": ev.score_outputs(s_test, "test"), "teacher_test_metric": t_stats["test_metric"],
               "agreement_with_teacher": agreement(s_test, ev.reference("test"), ev.names)["worst"]}
    return metrics


def curves_best(curves: list[dict], best_epoch: int) -> float:
    return next(c["val_metric"] for c in curves if c["epoch"] == best_epoch)


def _report(folder: Path, metrics: dict, targets: dict) -> str | None:
    """The report's distillation curves."""
    from edge_pipeline.plots import figure, plt

    if not (folder / "curves.json").is_file():
        return None
    curves = json.loads((folder / "curves.json").read_text())
    ep = [c["epoch"] for c in curves]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.4))
    a1.plot(ep, [c["train_loss"] for c in curves], label="train")
    if "val_loss" in curves[0]:
        a1.plot(ep, [c["val_loss"] for c in curves], label="val")
    a1.legend(fontsize=7)
    a1.set_title("distillation loss")
    a2.plot(ep, [c["val_metric"] for c in curves], label="val metric")
    a2.plot(ep, [c["val_cosine"] for c in curves], label="cosine with teacher (worst output)")
    a2.legend(fontsize=7)
    a2.set_xlabel("epoch")
    return figure("Distillation curves", fig)


STAGE = Stage("distill", 2, ("teacher", "prune"), lambda r: r.distill.model_dump(), lambda r: r.distill.enabled,
              check=lambda ctx: check_config(ctx.recipe, ctx.iface, ctx.data, ctx.recipe_path),
              produces_model=True, trains=True, command="Distill the teacher into the student.",
              summary_keys=("macs_fraction_of_teacher", "test_metric", "teacher_test_metric", "epochs_run"),
              report=_report,
              card=lambda d, m: (f"- **distill**: student test {m.get('metric') or 'metric'} "
                                 f"{fmt_metric(d.get('test_metric'))} "
                                 f"(teacher {fmt_metric(d.get('teacher_test_metric'))}), "
                                 f"{d['macs_fraction_of_teacher']:.1%} of the teacher's MACs."))
