"""Stage 4: lower the model to every target profile, then check each artifact in its own runtime.

Per target: export through the profile's backend, evaluate on the validation split (for choices) and the
test split (for reporting), and a parity check on golden inputs against the PyTorch model it came from. An
int8 target that misses ``max_accuracy_drop`` keeps its most sensitive layers in float, one at a time, up to
``max_float_layers``. A target that cannot be lowered fails alone, with the unsupported op named.
"""

from __future__ import annotations

import json
import re
import shutil
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline import progress
from edge_pipeline.backends import get_backend
from edge_pipeline.devices.runner import load_runner
from edge_pipeline.errors import PipelineError
from edge_pipeline.modelio import load_model
from edge_pipeline.sources import Splits
from edge_pipeline.targets import Profile, load_profile
from edge_pipeline.training import agreement, predict, top1

GOLDEN_SAMPLES = 32


def run_artifact(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    model = load_runner().Model(str(path), threads)
    return np.concatenate([model.run(x[i:i + 1]) for i in range(len(x))])


def locate_failure(model: nn.Module, example: torch.Tensor, err: BaseException) -> tuple[str, str | None]:
    """The op a backend refused and the module it sits in, found in the exported graph where possible."""
    text = f"{type(err).__name__}: {err}"
    try:
        ep = torch.export.export(model, (example,))
    except Exception:
        return text, None
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = str(node.target)
        short = op.split(".")[0] if "::" in op else op
        names = {op, short, op.replace("::", "."), op.split("::")[-1].split(".")[0]}
        if any(n and n in text for n in names) and not op.startswith("aten."):
            stack = node.meta.get("nn_module_stack") or {}
            where = list(stack.values())[-1][0] if stack else node.name
            return text, f"op {op} in module '{where}'"
    m = re.search(r"([A-Za-z_]+::[A-Za-z_0-9.]+|aten\.[A-Za-z_0-9.]+)", text)
    return text, f"op {m.group(1)}" if m else None


def evaluate(path: Path, data: Splits, reference_test: np.ndarray, golden_ref: np.ndarray, profile: Profile) -> dict:
    val = run_artifact(path, data.val.x, profile.threads)
    test = run_artifact(path, data.test.x, profile.threads)
    golden = test[:GOLDEN_SAMPLES]
    parity = agreement(golden, golden_ref)
    tol = profile.budgets.parity
    parity_ok = (parity["cosine"] >= tol.min_cosine and parity["top1_agreement"] >= tol.min_top1_agreement
                 and (tol.max_abs is None or parity["max_abs"] <= tol.max_abs))
    out = {"size_bytes": path.stat().st_size, "parity": parity, "parity_ok": parity_ok,
           "test_agreement_with_float": agreement(test, reference_test)["top1_agreement"]}
    if data.val.y is not None:
        out["val_accuracy"] = top1(val, data.val.y)
        out["test_accuracy"] = top1(test, data.test.y)
    return out


def _quant_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def lower_target(model: nn.Module, profile: Profile, data: Splits, calibration: np.ndarray, out: Path,
                 float_metrics: dict, reference_test: np.ndarray) -> dict:
    """Export one target (with the float fallback when its accuracy budget is missed) and check it."""
    backend = get_backend(profile.backend)
    example = torch.from_numpy(data.test.x[:1])
    golden_ref = reference_test[:GOLDEN_SAMPLES]
    tdir = out / profile.name

    def build(float_layers) -> tuple[Path, dict]:
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True)
        path = backend.export(model, example, calibration, profile, tdir, float_layers=float_layers)
        return path, evaluate(path, data, reference_test, golden_ref, profile)

    path, metrics = build(())
    drop_budget = profile.budgets.max_accuracy_drop
    float_layers: list[str] = []
    if profile.precision == "int8" and drop_budget is not None and "val_accuracy" in metrics:
        sensitivity = None
        while float_metrics["val_accuracy"] - metrics["val_accuracy"] > drop_budget:
            if len(float_layers) >= profile.quantization.max_float_layers:
                metrics["fallback_exhausted"] = True
                break
            if sensitivity is None:
                sensitivity = layer_sensitivity(model, profile, data, calibration, example)
                metrics["layer_sensitivity"] = sensitivity
            rest = [n for n in sorted(sensitivity, key=sensitivity.get, reverse=True) if n not in float_layers]
            if not rest:
                break
            float_layers.append(rest[0])
            progress.note(f"{profile.name}: keeping '{rest[0]}' in float (val accuracy "
                          f"{metrics['val_accuracy']:.4f} misses the budget)")
            path, new = build(tuple(float_layers))
            new["layer_sensitivity"] = metrics.get("layer_sensitivity")
            metrics = new
    metrics["float_layers"] = float_layers
    metrics["artifact"] = str(path.relative_to(out))
    metrics["describe"] = backend.describe(path)
    if "test_accuracy" in metrics:
        metrics["accuracy_drop"] = float_metrics["test_accuracy"] - metrics["test_accuracy"]
    metrics["failures"] = budget_failures(profile, metrics, float_metrics)
    return metrics


def layer_sensitivity(model, profile, data, calibration, example) -> dict[str, float]:
    """Validation accuracy lost when only this layer is quantized (every other layer kept in float)."""
    backend = get_backend(profile.backend)
    layers = _quant_layers(model)
    out: dict[str, float] = {}
    base = top1(predict(model, data.val.x), data.val.y)
    import tempfile

    with progress.task(f"{profile.name}: layer sensitivity", total=len(layers)) as t:
        for name in layers:
            with tempfile.TemporaryDirectory() as tmp:
                path = backend.export(model, example, calibration, profile, Path(tmp),
                                      float_layers=tuple(n for n in layers if n != name))
                out[name] = base - top1(run_artifact(path, data.val.x), data.val.y)
            t.advance()
    return out


def budget_failures(profile: Profile, m: dict, float_metrics: dict) -> list[str]:
    b, fails = profile.budgets, []
    if not m["parity_ok"]:
        fails.append(f"parity {m['parity']} beyond tolerance {b.parity.model_dump()}")
    if b.max_size_bytes and m["size_bytes"] > b.max_size_bytes:
        fails.append(f"size {m['size_bytes']} > max_size_bytes {b.max_size_bytes}")
    if b.max_accuracy_drop is not None and "accuracy_drop" in m and m["accuracy_drop"] > b.max_accuracy_drop + 1e-9:
        fails.append(f"test accuracy drop {m['accuracy_drop']:.4f} > max_accuracy_drop {b.max_accuracy_drop}")
    return fails


def lower_all(model: nn.Module, profiles: list[Profile], data: Splits, calibration: np.ndarray, out: Path) -> dict:
    reference_test = predict(model, data.test.x)
    float_metrics = {}
    if data.val.y is not None:
        float_metrics = {"val_accuracy": top1(predict(model, data.val.x), data.val.y),
                         "test_accuracy": top1(reference_test, data.test.y)}
    targets, failed = {}, []
    with progress.task("lowering", total=len(profiles)) as t:
        for profile in profiles:
            t.advance(0, f"lowering {profile.name}")
            try:
                m = lower_target(model, profile, data, calibration, out, float_metrics, reference_test)
            except PipelineError as e:
                m = {"error": str(e), "failures": [str(e)]}
            except Exception as e:  # a backend refusing the model fails this target only
                text, where = locate_failure(model, torch.from_numpy(data.test.x[:1]), e)
                m = {"error": f"cannot lower to {profile.backend}: {text.splitlines()[0][:400]}", "where": where,
                     "failures": [f"lowering failed{' at ' + where if where else ''}"],
                     "traceback": traceback.format_exc()[-2000:]}
                shutil.rmtree(out / profile.name, ignore_errors=True)
            if m["failures"]:
                failed.append(profile.name)
            targets[profile.name] = {"backend": profile.backend, "precision": profile.precision, **m}
            t.advance()
    return {"float": float_metrics, "targets": targets, "failed_targets": failed}


def run(ctx, out: Path) -> dict:
    model, _ = load_model(ctx.model_dir() / "model.pt")
    calibration = np.load(ctx.stage_dir("calibrate") / "calibration.npz")["x"]
    profiles = [load_profile(t) for t in ctx.recipe.targets]
    result = lower_all(model, profiles, ctx.data, calibration, out)
    np.savez(out / "golden.npz", x=ctx.data.test.x[:GOLDEN_SAMPLES],
             y=predict(model, ctx.data.test.x[:GOLDEN_SAMPLES]))
    (out / "targets.json").write_text(json.dumps(result["targets"], indent=1, default=str))
    return result
