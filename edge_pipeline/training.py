"""Training shared by the stages: the plain fit (teacher, prune fine-tune), the teacher-student loss and the
short fit against a teacher (distill, prune, qat), the device choice and the per-epoch curve point."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge_pipeline import distributed, progress
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator, agreement, predict
from edge_pipeline.interface import FlatModel
from edge_pipeline.recipe import DistillConfig
from edge_pipeline.sources import Split


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def tensors(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in arrays]


def fit(model: nn.Module, train: Split, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
        batch_loss: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor] | None = None,
        description: str = "training") -> nn.Module:
    """Training with AdamW and a cosine schedule, deterministic for a given seed, streaming the split batch by
    batch. ``batch_loss(inputs, labels)`` defaults to cross-entropy on the model's output and the labels."""
    seed_everything(seed)
    batch_loss = batch_loss or (lambda xs, y: nn.functional.cross_entropy(model(*xs), y))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = warmup_cosine(opt, steps_per_epoch, epochs * steps_per_epoch)
    model.train()
    with progress.task(description, total=epochs) as t:
        for epoch in range(epochs):
            for inputs, y in train.batches(batch_size, seed=seed + epoch):
                opt.zero_grad()
                batch_loss(tensors(inputs), None if y is None else torch.from_numpy(y)).backward()
                opt.step()
                sched.step()
            t.advance()
    return model.eval()


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


def logit_outputs(requested: list[str] | None, ev: Evaluator) -> list[str]:
    """Outputs distilled as class scores: as the recipe names them, else the metric's output with labels."""
    if requested is not None:
        return requested
    return [ev.metric.output] if ev.metric.output and ev.data.train.y is not None else []


def loss_for(cfg: DistillConfig | None, ev: Evaluator, alpha: float | None = None,
             temperature: float | None = None):
    """The student's loss against the teacher, over every output: KD at the temperature (plus cross-entropy
    on the labels) for class-score outputs, MSE for the rest (boxes, landmarks, embeddings, probabilities)."""
    names = ev.names
    logits = set(logit_outputs(cfg.logit_outputs if cfg else None, ev))
    alpha = cfg.alpha if cfg else alpha
    t = cfg.temperature if cfg else temperature
    soft_only = cfg.soft_only if cfg else False

    def loss(s_outs, t_outs, labels):
        total = 0.0
        for name, s, te in zip(names, s_outs, t_outs, strict=True):
            if name in logits:
                total = total + kd_loss(s.flatten(1), te.flatten(1), labels if name == ev.metric.output else None,
                                        alpha, t, soft_only)
            else:
                total = total + F.mse_loss(s.float(), te.float())
        return total / len(names)
    return loss


def fit_to_teacher(student: nn.Module, teacher: nn.Module, split, loss, epochs: int, lr: float, seed: int = 0,
                   description: str = "training") -> nn.Module:
    """A short plain fine-tune against the teacher (used after pruning); streams the split."""
    flat_s, flat_t = FlatModel(student), FlatModel(teacher).eval()

    def batch_loss(xs, y):
        with torch.no_grad():
            t_out = flat_t(*xs)
        return loss(flat_s(*xs), t_out, y)

    return fit(student, split, epochs, lr, seed=seed, batch_loss=batch_loss, description=description)


def epoch_point(s_val, t_val, y_val, loss_fn, ev: Evaluator, epoch: int, train_loss: float) -> dict:
    """One epoch's point on the training curve: the loss on val against the teacher, the metric, the cosine."""
    val_loss = loss_fn(tensors(s_val), tensors(t_val), y_val).item()
    return {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
            "val_metric": ev.score_outputs(s_val, "val"),
            "val_cosine": agreement(s_val, t_val, ev.names)["worst"]["cosine"]}


@dataclass
class TeacherFit:
    """The result of :func:`fit_against_teacher`: the best epoch's state, the curves, the best epoch."""
    best: dict[str, torch.Tensor]
    curves: list[dict]
    best_epoch: int


def fit_against_teacher(model: nn.Module, forward: nn.Module, teacher: nn.Module, data, loss_fn, ev: Evaluator, *,
                        params, epochs: int, lr: float, weight_decay: float, batch_size: int, warmup_epochs: int,
                        seed: int, device: str, description: str, resume: Path | None = None,
                        patience: int | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
                        extra_state: nn.Module | None = None, start_epoch: Callable[[int], None] | None = None,
                        val_outputs: Callable[[], list[np.ndarray]] | None = None,
                        min_batch: int = 1) -> TeacherFit:
    """The one training loop of distill and qat: AdamW with warm-up and cosine, the teacher's outputs computed
    batch by batch (a streamed split is never held), DDP when ``forward`` is wrapped in it, each rank on its own
    stride of the same permutation, a curve point per epoch, the best epoch kept (the metric first, the val loss
    breaking ties: a small val split saturates within an epoch or two, and on the metric alone the best would be
    a barely trained early epoch), a checkpoint per epoch that a killed run resumes from, and an early stop after
    ``patience`` epochs without improvement.

    ``model``'s state is what is kept and checkpointed (``extra_state``'s too, e.g. hint projections);
    ``forward`` is called on each batch; ``start_epoch(epoch)`` runs before each epoch (QAT's freezing);
    ``val_outputs()`` gives the model's val outputs (default: ``model`` run in eval mode)."""
    flat_teacher = FlatModel(teacher).to(device).eval()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    world, rank = distributed.world_size(), distributed.rank()
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / world) / batch_size)
    sched = warmup_cosine(opt, warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    sign = 1 if ev.metric.higher_is_better else -1
    t_val = ev.reference("val")
    y_val = None if data.val.y is None else torch.from_numpy(data.val.y)
    val_outputs = val_outputs or (lambda: predict(model, data.val, batch_size=batch_size, device=device))

    curves, best, best_score, best_epoch, start, stale = [], None, (-math.inf, -math.inf), 0, 0, 0
    if resume is not None and resume.is_file():
        ck = torch.load(resume, weights_only=True, map_location="cpu")
        model.load_state_dict(ck["state"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        if extra_state is not None:
            extra_state.load_state_dict(ck["extra"])
        curves, best_score = json.loads(ck["curves"]), tuple(ck["best_score"])
        start, stale, best_epoch, best = int(ck["epoch"]), int(ck["stale"]), int(ck["best_epoch"]), ck["best"]
        progress.note(f"{description}: resumed after epoch {start}")

    with progress.task(description, total=epochs) as task:
        task.advance(start)
        for epoch in range(start, epochs):
            forward.train()
            torch.manual_seed(seed + epoch)  # dropout draws by epoch: a resumed run draws what an unbroken one does
            if start_epoch is not None:
                start_epoch(epoch)
            total, seen = 0.0, 0
            for inputs, y in data.train.batches(batch_size, seed=seed + epoch, rank=rank, world=world):
                if len(inputs[0]) < min_batch:
                    continue  # e.g. a last batch of one row: BatchNorm in training mode cannot use it
                xb = [t.to(device) for t in tensors(inputs)]
                with torch.no_grad():
                    t_b = flat_teacher(*xb)
                loss = loss_fn(forward(*xb), t_b, None if y is None else torch.from_numpy(y).to(device))
                if extra_loss is not None:
                    loss = loss + extra_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(inputs[0])
                seen += len(inputs[0])
            point = epoch_point(val_outputs(), t_val, y_val, loss_fn, ev, epoch, total / max(1, seen))
            curves.append(point)
            score = (sign * point["val_metric"], -point["val_loss"])
            if score > best_score:
                best_score, best_epoch, stale = score, epoch + 1, 0
                best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            if resume is not None and distributed.is_main():
                tmp = resume.with_name(f".partial{resume.name}")  # not matched by a glob for the checkpoint
                torch.save({"state": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "extra": extra_state.state_dict() if extra_state is not None else {},
                            "curves": json.dumps(curves), "best_score": list(best_score), "best_epoch": best_epoch,
                            "epoch": epoch + 1, "stale": stale, "best": best}, tmp)
                tmp.replace(resume)
            task.advance()
            if patience is not None and stale >= patience:
                progress.note(f"{description}: early stop after epoch {epoch + 1}")
                break
    return TeacherFit(best, curves, best_epoch)
