"""The one place that runs a model or an artifact over a split and scores it with the recipe's metric.

Used by every stage that measures: teacher, prune, distill, lower (parity on the full test split),
device-test, package, verify and bench. Outputs are always a list of arrays, one per named output of the
model interface, rows in split order.

Metrics: ``top1``/``top5`` (labels; on the recipe's ``metric_output``), per-output ``cosine``, ``sqnr`` and
``max_abs`` against the float model's outputs (``auto`` picks cosine when there are no labels), ``agreement``
(top-1 agreement with the float teacher, for classifiers without labels), or a user's
``package.module:callable(outputs: dict[name, array], labels) -> float`` (higher is better).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import FlatModel, ModelInterface
from edge_pipeline.sources.data import Split, Splits

BUILTIN_METRICS = ("top1", "top5", "agreement", "cosine", "sqnr", "max_abs")


def _cat(chunks: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 64, device: str = "cpu") -> list[np.ndarray]:
    """Every output of the model over the split, batched, in eval mode (the mode is restored after)."""
    flat = model if isinstance(model, FlatModel) else FlatModel(model)
    was_training = flat.model.training  # the wrapped model's mode: a fresh wrapper says "training"
    flat.eval()
    chunks = []
    for inputs, _ in split.batches(batch_size):
        outs = flat(*[torch.from_numpy(a).to(device) for a in inputs])
        chunks.append([o.detach().float().cpu().numpy() for o in outs])
    flat.model.train(was_training)
    return _cat(chunks)


def example_inputs(data: Splits, rows: int = 1) -> tuple[torch.Tensor, ...]:
    """The first test rows as the example batch every backend exports with (batch 1 ships)."""
    return tuple(torch.from_numpy(a) for a in data.test.rows(np.arange(rows)))


def run_artifact(path: Path, split: Split, threads: int = 1, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of a deployable artifact over the split, in this process through the on-device runner's
    own Model class, one row at a time (shipped artifacts take batch 1)."""
    from edge_pipeline.harness import runner as harness

    model = harness.Model(str(path), threads)
    chunks = []
    for inputs, _ in split.batches(batch_size):
        chunks += [model.run([a[i:i + 1] for a in inputs]) for i in range(len(inputs[0]))]
    return _cat(chunks)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64)


def output_agreement(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How close one output is to the reference model's: mean cosine, SQNR (dB), max-abs, top-1 agreement."""
    a, b = _rows(out), _rows(ref)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos[both_zero] = 1.0
    noise = float(((a - b) ** 2).sum())
    res = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "max_abs": float(np.abs(a - b).max()),
           "sqnr_db": float("inf") if noise == 0 else float(10 * np.log10((b ** 2).sum() / noise + 1e-30))}
    if a.shape[1] > 1:
        res["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return res


def agreement(outputs: list[np.ndarray], reference: list[np.ndarray], names: list[str]) -> dict[str, dict]:
    """Per named output, plus ``worst``: the lowest cosine and SQNR and the largest max-abs over outputs."""
    per = {n: output_agreement(o, r) for n, o, r in zip(names, outputs, reference, strict=True)}
    worst = {"cosine": min(v["cosine"] for v in per.values()), "sqnr_db": min(v["sqnr_db"] for v in per.values()),
             "max_abs": max(v["max_abs"] for v in per.values())}
    tops = [v["top1_agreement"] for v in per.values() if "top1_agreement" in v]
    if tops:
        worst["top1_agreement"] = min(tops)
    return {"outputs": per, "worst": worst}


@dataclass(frozen=True)
class Metric:
    """A score of outputs (dict by name) against labels and the float reference outputs."""

    name: str
    fn: Callable[[dict, np.ndarray | None, dict], float]
    higher_is_better: bool = True
    output: str | None = None  # the output top-k scores

    def __call__(self, outputs: dict, labels, reference: dict) -> float:
        return float(self.fn(outputs, labels, reference))

    def drop(self, value: float | None, float_value: float | None) -> float | None:
        """How much worse than the float model it came from: what ``max_accuracy_drop`` budgets. None where
        either is unknown or unbounded (the teacher's SQNR against itself)."""
        if value is None or float_value is None or not np.isfinite(float_value):
            return None
        return float_value - value if self.higher_is_better else value - float_value


def _topk(k: int, output: str):
    def score(outs, labels, _ref):
        logits = _rows(outs[output])
        top = np.argsort(-logits, axis=1)[:, :k]
        return float((top == labels[:, None]).any(1).mean())
    return score


def _vs_reference(key: str, worst):
    def score(outs, _labels, ref):
        return worst(output_agreement(outs[n], ref[n])[key] for n in outs)
    return score


def resolve_metric(spec: str, output_names: list[str], has_labels: bool, metric_output: str | None = None,
                   where: str = "recipe: metric") -> Metric:
    """The recipe's metric for this model; ``auto`` is top1 with labels, else cosine against the float model."""
    if spec == "auto":
        spec = "top1" if has_labels else "cosine"
    if metric_output is not None and metric_output not in output_names:
        raise PipelineError(f"metric_output '{metric_output}' is not an output of the model",
                            where=where.replace("metric", "metric_output"),
                            hint=f"outputs: {', '.join(output_names)}")
    output = metric_output or output_names[0]
    if spec in ("top1", "top5"):
        if not has_labels:
            raise PipelineError(f"metric {spec} needs labels, and the data has none", where=where,
                                hint="use cosine, sqnr or max_abs (against the float model), or a callable")
        return Metric(spec, _topk(int(spec[3]), output), output=output)
    if spec == "agreement":  # top-1 agreement with the float teacher: the float model's top-1 as the label
        return Metric(spec, lambda outs, _labels, ref: output_agreement(outs[output], ref[output])["top1_agreement"],
                      output=output)
    if spec == "cosine":
        return Metric(spec, _vs_reference("cosine", min))
    if spec == "sqnr":
        return Metric(spec, _vs_reference("sqnr_db", min))
    if spec == "max_abs":
        return Metric(spec, _vs_reference("max_abs", max), higher_is_better=False)
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise PipelineError(f"unknown metric '{spec}'", where=where,
                            hint=f"use {', '.join(BUILTIN_METRICS)}, auto, or package.module:callable")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"cannot load metric '{spec}': {e}", where=where) from None
    return Metric(spec, lambda outs, labels, _ref: fn(outs, labels))


def score(metric: Metric, outputs: list[np.ndarray], labels, reference: list[np.ndarray],
          names: list[str]) -> float:
    by_name = dict(zip(names, outputs, strict=True))
    ref = dict(zip(names, reference, strict=True))
    try:
        return metric(by_name, labels, ref)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - a user metric failing is bad input, said plainly
        raise PipelineError(f"metric '{metric.name}' failed: {type(e).__name__}: {e}", where="recipe: metric",
                            hint="a metric takes (outputs: dict of name -> array, labels) and returns a float") \
            from None


class Evaluator:
    """Scores outputs and models on a split with the recipe's metric, against the teacher's outputs (computed
    once per split and kept): the one reference every stage, backend and device is measured against."""

    def __init__(self, data: Splits, iface: ModelInterface, metric: Metric, teacher: nn.Module):
        self.data, self.iface, self.metric, self.teacher = data, iface, metric, teacher
        self._reference: dict[str, list[np.ndarray]] = {}

    @property
    def names(self) -> list[str]:
        return self.iface.output_names

    def reference(self, split: str) -> list[np.ndarray]:
        if split not in self._reference:
            self._reference[split] = predict(self.teacher, getattr(self.data, split))
        return self._reference[split]

    def score_outputs(self, outputs: list[np.ndarray], split: str) -> float:
        return score(self.metric, outputs, getattr(self.data, split).y, self.reference(split), self.names)

    def score_model(self, model: nn.Module, split: str) -> float:
        return self.score_outputs(predict(model, getattr(self.data, split)), split)

    def figures(self, outputs: list[np.ndarray], split: str = "test") -> dict:
        """The metric and the agreement with the teacher (per output and worst), for run.json."""
        return {"metric": self.metric.name, f"{split}_metric": self.score_outputs(outputs, split),
                "agreement_with_teacher": agreement(outputs, self.reference(split), self.names)}
