"""Stage 2: distill the teacher into a small student.

Loss: ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels)`` (soft targets only for
unlabeled data), plus an optional hint loss between named layers through a learned 1x1 projection.
AdamW with warm-up and cosine decay, evaluation each epoch, early stopping, best checkpoint kept, and a
per-epoch checkpoint to resume from after a kill. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edge_pipeline import distributed, progress
from edge_pipeline.errors import PipelineError
from edge_pipeline.modelio import load_model, save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import DistillConfig
from edge_pipeline.sources import Splits, build_model
from edge_pipeline.training import agreement, predict, seed_everything, top1, warmup_cosine


@dataclass(frozen=True)
class DistillResult:
    model: nn.Module
    arch: dict
    curves: list[dict]  # per epoch: train_loss, val_accuracy, val_agreement
    best_epoch: int


def pick_device(requested: str, where: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("distill.device is 'cuda' but no CUDA device is available", where=where,
                            hint="use device: auto or cpu")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float, soft_only: bool):
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * t * t
    if soft_only or labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


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
            student.eval()(example)
            teacher.eval()(example)
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


def make_student(cfg: DistillConfig, teacher_arch: dict, pruned_dir: Path | None, data: Splits, where: str):
    if cfg.student == "pruned":
        if pruned_dir is None:
            raise PipelineError("distill.student is 'pruned' but the prune stage is disabled", where=where,
                                hint="enable prune, or set distill.student to teacher@0.5 or a model source")
        return load_model(pruned_dir / "model.pt")
    if cfg.student.startswith("teacher@"):
        try:
            width = float(cfg.student.split("@", 1)[1])
        except ValueError:
            raise PipelineError(f"bad width in '{cfg.student}'", where=f"{where}: distill.student",
                                hint="use teacher@0.5") from None
        arch = {**teacher_arch, "width": width}
    else:
        arch = {"source": cfg.student, "num_classes": data.num_classes, "in_channels": data.input_shape[0],
                "width": 1.0}
    model = build_model(arch["source"], arch["num_classes"], arch["in_channels"], arch["width"],
                        where=f"{where}: distill.student")
    return model, arch


def distill(teacher: nn.Module, student: nn.Module, arch: dict, data: Splits, cfg: DistillConfig,
            where: str = "recipe", resume: Path | None = None) -> DistillResult:
    device = pick_device(cfg.device, f"{where}: distill.device")
    distributed.init(device)
    seed_everything(cfg.seed)
    labels_known = data.train.y is not None
    example = torch.from_numpy(data.train.x[:2])
    with torch.no_grad():
        t_out, s_out = teacher.eval()(example), student.eval()(example)
    if t_out.shape != s_out.shape:
        raise PipelineError(f"student output shape {tuple(s_out.shape[1:])} differs from the teacher's "
                            f"{tuple(t_out.shape[1:])}", where=f"{where}: distill.student",
                            hint="the student must predict the same classes as the teacher")
    hints = _Hints(student, teacher, cfg.hint_layers, example, where) if cfg.hint_layers else None
    if device == "cuda" and distributed.world_size() > 1:
        torch.cuda.set_device(distributed.rank() % torch.cuda.device_count())
    teacher.to(device).eval()
    student.to(device)
    params = list(student.parameters()) + (list(hints.proj.parameters()) if hints else [])
    if hints:
        hints.to(device)
    train_model: nn.Module = student
    if distributed.world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    world, rank = distributed.world_size(), distributed.rank()
    n = len(data.train)
    per_rank = math.ceil(n / world)
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    sched = warmup_cosine(opt, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    x_all = torch.from_numpy(data.train.x)
    y_all = torch.from_numpy(data.train.y) if labels_known else None
    # Teacher outputs cached once: there is no augmentation, so they never change.
    t_logits = torch.from_numpy(predict(teacher, data.train.x, device=device))
    t_val = predict(teacher, data.val.x, device=device)

    y_val = torch.from_numpy(data.val.y) if data.val.y is not None else None
    curves, best, best_score, best_epoch, start, stale = [], None, (-1.0, -math.inf), 0, 0, 0
    if resume is not None and resume.is_file():
        ck = torch.load(resume, weights_only=True, map_location="cpu")
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        if hints:
            hints.proj.load_state_dict(ck["hints"])
        curves, best_score = json.loads(ck["curves"]), tuple(ck["best_score"])
        start, stale, best_epoch = int(ck["epoch"]), int(ck["stale"]), int(ck["best_epoch"])
        best = ck["best"]
        progress.note(f"distill: resumed after epoch {start}")

    with progress.task("distilling", total=cfg.epochs) as task:
        task.advance(start)
        for epoch in range(start, cfg.epochs):
            # The same permutation on every rank; each takes its own stride (DistributedSampler's scheme).
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            perm = torch.cat([perm, perm[: per_rank * world - n]])[rank::world]
            train_model.train()
            total = 0.0
            for i in range(0, len(perm), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb = x_all[idx].to(device)
                if hints:
                    with torch.no_grad():
                        teacher(xb)
                out = train_model(xb)
                loss = kd_loss(out, t_logits[idx].to(device), None if y_all is None else y_all[idx].to(device),
                               cfg.alpha, cfg.temperature, cfg.soft_only)
                if hints:
                    loss = loss + cfg.hint_weight * hints.loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            s_val = predict(student, data.val.x, device=device)
            val_loss = kd_loss(torch.from_numpy(s_val), torch.from_numpy(t_val), y_val, cfg.alpha, cfg.temperature,
                               cfg.soft_only).item()
            point = {"epoch": epoch + 1, "train_loss": total / len(perm), "val_loss": val_loss,
                     "val_agreement": agreement(s_val, t_val)["top1_agreement"]}
            if data.val.y is not None:
                point["val_accuracy"] = top1(s_val, data.val.y)
            curves.append(point)
            # Accuracy first; the loss breaks ties. A small val split saturates at 100% within an epoch or two,
            # and on accuracy alone the best checkpoint would be that barely distilled early epoch.
            score = (point.get("val_accuracy", point["val_agreement"]), -val_loss)
            if score > best_score:
                best_score, stale = score, 0
                best_epoch = epoch + 1
                best = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
            else:
                stale += 1
            if resume is not None and distributed.is_main():
                tmp = resume.with_suffix(".tmp")
                torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "hints": hints.proj.state_dict() if hints else {}, "curves": json.dumps(curves),
                            "best_score": list(best_score), "best_epoch": best_epoch, "epoch": epoch + 1,
                            "stale": stale, "best": best}, tmp)
                tmp.replace(resume)
            task.advance()
            if stale >= cfg.patience:
                progress.note(f"distill: early stop after epoch {epoch + 1}")
                break
    student.load_state_dict(best)
    return DistillResult(student.cpu().eval(), arch, curves, best_epoch)


def run(ctx, out: Path) -> dict:
    teacher, teacher_arch = load_model(ctx.stage_dir("teacher") / "model.pt")
    cfg = ctx.recipe.distill
    student, arch = make_student(cfg, teacher_arch, ctx.stage_dir("prune"), ctx.data, ctx.recipe_path)
    resume = ctx.store.dir / f".distill-resume-{ctx.keys['distill'][:16]}.pt"
    res = distill(teacher, student, arch, ctx.data, cfg, where=ctx.recipe_path, resume=resume)
    save_model(res.model, res.arch, out / "model.pt")
    (out / "curves.json").write_text(json.dumps(res.curves, indent=1))
    if distributed.is_main():
        resume.unlink(missing_ok=True)
    stats = model_stats(res.model, ctx.data.input_shape)
    t_stats = ctx.metrics["teacher"]
    metrics = {**stats, "macs_fraction_of_teacher": stats["macs"] / t_stats["macs"],
               "params_fraction_of_teacher": stats["params"] / t_stats["params"],
               "best_epoch": res.best_epoch, "epochs_run": len(res.curves), "world_size": distributed.world_size()}
    s_test = predict(res.model, ctx.data.test.x)
    t_test = predict(teacher, ctx.data.test.x)
    metrics["test_agreement_with_teacher"] = agreement(s_test, t_test)["top1_agreement"]
    if ctx.data.test.y is not None:
        metrics["val_accuracy"] = max(p["val_accuracy"] for p in res.curves)
        metrics["test_accuracy"] = top1(s_test, ctx.data.test.y)
        metrics["teacher_test_accuracy"] = top1(t_test, ctx.data.test.y)
    return metrics

