"""Training helpers shared by the teacher, the prune fine-tune and distillation."""

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
