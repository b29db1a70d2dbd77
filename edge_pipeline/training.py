"""Training and evaluation helpers shared by the teacher, the prune fine-tune and distillation."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edge_pipeline import progress
from edge_pipeline.sources import Split


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Logits for ``x`` in eval mode (the model is put back in the mode it was in)."""
    was_training = model.training
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How close outputs are to a reference model's: top-1 agreement, max-abs and mean cosine."""
    a = logits.reshape(len(logits), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs": float(np.abs(a - b).max()), "cosine": float(cos.mean())}


def accuracy(model: nn.Module, split: Split) -> float:
    return top1(predict(model, split.x), split.y)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(model: nn.Module, train: Split, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        description: str = "training") -> nn.Module:
    """Plain supervised training with AdamW and a cosine schedule; deterministic for a given seed."""
    seed_everything(seed)
    loss_fn = loss_fn or nn.functional.cross_entropy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = warmup_cosine(opt, steps_per_epoch, epochs * steps_per_epoch)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with progress.task(description, total=epochs) as t:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
            t.advance()
    return model.eval()
