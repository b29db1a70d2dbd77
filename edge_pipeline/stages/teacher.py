"""Stage 0: the teacher. A zoo architecture is trained here, deterministically; a user's callable is taken
as already trained (optionally with ``weights`` loaded from a state_dict file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.modelio import save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import TeacherTrainConfig
from edge_pipeline.sources import Splits, build_model, is_zoo
from edge_pipeline.training import accuracy, fit, seed_everything


@dataclass(frozen=True)
class TeacherResult:
    model: nn.Module
    arch: dict
    metrics: dict


def make_teacher(source: str, data: Splits, cfg: TeacherTrainConfig, weights: str | None = None) -> TeacherResult:
    seed_everything(cfg.seed)
    arch = {"source": source, "num_classes": data.num_classes, "in_channels": data.input_shape[0], "width": 1.0}
    model = build_model(source, data.num_classes, data.input_shape[0])
    trained = False
    if weights:
        state = torch.load(weights, weights_only=True, map_location="cpu")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise PipelineError(f"weights do not fit {source}: {e}", where=f"recipe: weights ({weights})") from None
    elif is_zoo(source):
        if data.train.y is None:
            raise PipelineError("a zoo teacher is trained on labels, and the data has none", where="recipe: data",
                                hint="give a trained model (package.module:callable) for unlabeled data")
        fit(model, data.train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, description="training teacher")
        trained = True
    model.eval()
    metrics = {**model_stats(model, data.input_shape), "trained_here": trained}
    if data.val.y is not None:
        metrics["val_accuracy"] = accuracy(model, data.val)
        metrics["test_accuracy"] = accuracy(model, data.test)
    return TeacherResult(model, arch, metrics)


def run(ctx, out: Path) -> dict:
    res = make_teacher(ctx.recipe.model, ctx.data, ctx.recipe.train, ctx.recipe.weights)
    save_model(res.model, res.arch, out / "model.pt")
    return res.metrics
