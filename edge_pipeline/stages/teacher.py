"""The teacher stage: the teacher. A zoo architecture is trained here, deterministically; a user's callable is taken
as already trained (optionally with ``weights`` loaded from a state_dict file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import BUILTIN_METRICS, Evaluator, Metric
from edge_pipeline.interface import ModelInterface
from edge_pipeline.modelio import save_model
from edge_pipeline.modelstats import model_stats
from edge_pipeline.recipe import TeacherTrainConfig
from edge_pipeline.sources import Splits, build_model, is_zoo
from edge_pipeline.stages import Stage, fmt_metric
from edge_pipeline.training import fit, seed_everything


@dataclass(frozen=True)
class TeacherResult:
    model: nn.Module
    arch: dict
    metrics: dict


def load_weights(model: nn.Module, weights: str, where: str) -> None:
    """A state_dict file, loaded without unpickling code; every failure is said plainly."""
    import pickle

    try:
        state = torch.load(weights, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise PipelineError("weights file holds pickled code or objects, which are not loaded", where=where,
                            hint="save a plain state_dict: torch.save(model.state_dict(), path)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise PipelineError(f"weights file cannot be read (truncated or not a torch file): {e}", where=where,
                            hint="save it again with torch.save(model.state_dict(), path)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise PipelineError(f"weights do not fit the model: {str(e)[:600]}", where=where) from None


def make_teacher(source: str, data: Splits, cfg: TeacherTrainConfig, iface: ModelInterface, metric: Metric,
                 weights: str | None = None) -> TeacherResult:
    seed_everything(cfg.seed)
    arch = {"source": source, "num_classes": data.num_classes, "in_channels": data.input_shape[0], "width": 1.0}
    model = build_model(source, data.num_classes, data.input_shape[0])
    trained = False
    if weights:
        load_weights(model, weights, f"recipe: weights ({weights})")
    elif is_zoo(source):
        if data.train.y is None:
            raise PipelineError("a zoo teacher is trained on labels, and the data has none", where="recipe: data",
                                hint="give a trained model (package.module:callable) for unlabeled data")
        fit(model, data.train, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, description="training teacher")
        trained = True
    model.eval()
    ev = Evaluator(data, iface, metric, model)
    metrics = {**model_stats(model, data.example), "trained_here": trained, "interface": iface.to_dict(),
               "metric": metric.name, "val_metric": ev.score_model(model, "val"),
               "test_metric": ev.score_model(model, "test"), "classes": data.classes,
               "preprocessing": data.preprocessing}
    return TeacherResult(model, arch, metrics)


def run(ctx, out: Path) -> dict:
    res = make_teacher(ctx.recipe.model, ctx.data, ctx.recipe.train, ctx.iface, ctx.metric, ctx.recipe.weights)
    save_model(res.model, res.arch, out / "model.pt")
    return res.metrics


def user_code(recipe) -> dict:
    """Content hashes of what the teacher is built from: the weights file's bytes and the user's modules."""
    from edge_pipeline.runstore import module_fingerprint, sha256_file

    out = {"model_code": module_fingerprint(recipe.model), "data_code": module_fingerprint(recipe.data)}
    if recipe.weights and Path(recipe.weights).is_file():
        out["weights"] = sha256_file(Path(recipe.weights))
    if recipe.metric != "auto" and recipe.metric not in BUILTIN_METRICS:
        out["metric_code"] = module_fingerprint(recipe.metric)
    return out


STAGE = Stage(
    "teacher", 0, (), lambda r: {"model": r.model, "weights": r.weights, "data": r.data, "train": r.train.model_dump(),
                                 "metric": r.metric, "metric_output": r.metric_output},
    external=lambda ctx: {"data": ctx.data_fingerprint, **user_code(ctx.recipe)}, produces_model=True,
    summary_keys=("params", "macs", "metric", "test_metric"),
    card=lambda t, m: (f"- **teacher** `{m['recipe'].get('model')}`: {t['params']} params, {t['macs']} MACs, "
                       f"test {m.get('metric') or 'metric'} {fmt_metric(t.get('test_metric'))}."))
