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
    """The op a backend refused and the module it sits in, found by matching the exported graph's ops
    against the error text (e.g. 'STABLEHLO_SORT' names aten.sort, 'edgetest::mystery' a custom op)."""
    text = f"{type(err).__name__}: {err}"
    try:
        ep = torch.export.export(model, (example,))
    except Exception:  # noqa: BLE001 - the model may not export at all; then the message is all we have
        return text, None
    best = None
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = str(node.target)  # aten.sort.default, edgetest.mystery.default
        parts = op.replace("::", ".").split(".")
        namespace, base = parts[0], parts[1] if len(parts) > 1 else parts[0]
        names = [op, base] if namespace == "aten" else [op, base, f"{namespace}::{base}"]
        if any(re.search(rf"(?<![A-Za-z]){re.escape(n)}(?![A-Za-z])", text, re.IGNORECASE) for n in names if n):
            if best is None or len(base) > len(best[1]):
                best = (node, base, op)
    if best is not None:
        node, _, op = best
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else node.name
        return text, f"op {op} in module '{where or '(top level)'}'"
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
                 float_metrics: dict, reference_test: np.ndarray, sensitivity: bool = False) -> dict:
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
    labelled = "val_accuracy" in metrics
    int8 = profile.precision == "int8"
    mixed = getattr(backend, "MIXED_PRECISION", True)
    ranking = (layer_sensitivity(model, profile, data, calibration, example, metrics["val_accuracy"])
               if int8 and labelled and sensitivity and mixed else None)
    drop_budget = profile.budgets.max_accuracy_drop
    float_layers: list[str] = []
    all_int8 = {k: metrics[k] for k in ("size_bytes", "val_accuracy") if k in metrics}
    if int8 and labelled and drop_budget is not None and not mixed:
        if float_metrics["val_accuracy"] - metrics["val_accuracy"] > drop_budget:
            metrics["fallback"] = {"unsupported": f"backend {profile.backend} cannot keep layers in float; "
                                                  "the miss is reported as is"}
    elif int8 and labelled and drop_budget is not None:
        # Accuracy-aware fallback, decided on the validation split: most sensitive layers back to float.
        while float_metrics["val_accuracy"] - metrics["val_accuracy"] > drop_budget:
            if len(float_layers) >= profile.quantization.max_float_layers:
                metrics["fallback_exhausted"] = True
                break
            ranking = ranking or layer_sensitivity(model, profile, data, calibration, example,
                                                   all_int8["val_accuracy"])
            rest = [n for n in sorted(ranking, key=ranking.get, reverse=True) if n not in float_layers]
            if not rest:
                break
            float_layers.append(rest[0])
            progress.note(f"{profile.name}: keeping '{rest[0]}' in float (val accuracy "
                          f"{metrics['val_accuracy']:.4f} misses the budget)")
            path, metrics = build(tuple(float_layers))
    if ranking:
        metrics["layer_sensitivity"] = ranking
    if float_layers:
        metrics["fallback"] = {"float_layers": float_layers, "all_int8": all_int8,
                               "size_cost_bytes": metrics["size_bytes"] - all_int8["size_bytes"]}
    metrics["float_layers"] = float_layers
    metrics["artifact"] = str(path.relative_to(out))
    metrics["describe"] = backend.describe(path)
    if "test_accuracy" in metrics:
        metrics["accuracy_drop"] = float_metrics["test_accuracy"] - metrics["test_accuracy"]
    metrics["failures"] = budget_failures(profile, metrics)
    return metrics


def layer_sensitivity(model, profile, data, calibration, example, all_int8_val: float) -> dict[str, float]:
    """Per layer: the validation accuracy recovered when this layer alone stays in float (leave-one-out).

    That is the error this layer adds to the int8 model, and exactly what the fallback can buy back. (Quantizing
    a layer alone can look harmless while the same layer breaks the all-int8 model, so that is not used.)
    """
    import tempfile

    backend = get_backend(profile.backend)
    layers = _quant_layers(model)
    out: dict[str, float] = {}
    with progress.task(f"{profile.name}: layer sensitivity", total=len(layers)) as t:
        for name in layers:
            with tempfile.TemporaryDirectory() as tmp:
                path = backend.export(model, example, calibration, profile, Path(tmp), float_layers=(name,))
                out[name] = top1(run_artifact(path, data.val.x), data.val.y) - all_int8_val
            t.advance()
    return out


def budget_failures(profile: Profile, m: dict) -> list[str]:
    b = profile.budgets
    parity = [] if m["parity_ok"] else [f"parity {m['parity']} beyond tolerance {b.parity.model_dump()}"]
    return parity + b.violations(size_bytes=m["size_bytes"], accuracy_drop=m.get("accuracy_drop"))


def lower_all(model: nn.Module, profiles: list[Profile], data: Splits, calibration: np.ndarray, out: Path,
              sensitivity: bool = False) -> dict:
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
                m = lower_target(model, profile, data, calibration, out, float_metrics, reference_test, sensitivity)
            except PipelineError as e:
                m = {"error": str(e), "failures": [str(e)]}
            except Exception as e:  # a backend refusing the model fails this target only
                text, where = locate_failure(model, torch.from_numpy(data.test.x[:1]), e)
                described = out / profile.name / "describe.json"
                if where is None and described.is_file():
                    # Exported but would not load (e.g. ExecuTorch's "error 0x14", an operator missing from
                    # the runtime): the ops that ran outside the delegate are the suspects.
                    outside = json.loads(described.read_text()).get("portable_ops")
                    where = f"ops outside the delegate: {', '.join(outside)}" if outside else None
                m = {"error": f"cannot lower to {profile.backend}: {text.splitlines()[0][:400]}", "where": where,
                     "failures": [f"lowering failed{' at ' + where if where else ''}"],
                     "traceback": traceback.format_exc()[-2000:]}
                shutil.rmtree(out / profile.name, ignore_errors=True)
            if m["failures"]:
                failed.append(profile.name)
            targets[profile.name] = {"backend": profile.backend, "precision": profile.precision, **m}
            t.advance()
    return {"float": float_metrics, "targets": targets, "failed_targets": failed}


METHODS = {"executorch": ("minmax", "moving_average", "histogram"), "tflite": ("minmax", "moving_average", "histogram"),
           "onnxruntime": ("minmax", "moving_average", "percentile", "entropy")}


def compare_methods(model: nn.Module, profiles: list[Profile], data: Splits, calibration: np.ndarray) -> dict:
    """Accuracy of each calibration method per int8 backend, beside the backend's own default flow."""
    import tempfile

    example = torch.from_numpy(data.test.x[:1])
    out: dict[str, dict] = {}
    backends = {p.backend: p for p in profiles if p.precision == "int8"}
    runs = [(b, m) for b, p in backends.items() for m in (*METHODS[b], "default")]
    with progress.task("comparing calibration methods", total=len(runs)) as t:
        for backend, method in runs:
            profile = backends[backend]
            if method != "default":
                profile = profile.model_copy(update={"quantization": profile.quantization.model_copy(
                    update={"method": method})})
            with tempfile.TemporaryDirectory() as tmp:
                path = get_backend(backend).export(model, example, calibration, profile, Path(tmp),
                                                   default_flow=method == "default")
                val, test = run_artifact(path, data.val.x), run_artifact(path, data.test.x)
                out.setdefault(backend, {})[method] = {"val_accuracy": top1(val, data.val.y),
                                                       "test_accuracy": top1(test, data.test.y),
                                                       "size_bytes": path.stat().st_size}
            t.advance()
    return out


def run(ctx, out: Path) -> dict:
    model, _ = load_model(ctx.model_dir() / "model.pt")
    calibration = np.load(ctx.stage_dir("calibrate") / "calibration.npz")["x"]
    profiles = [load_profile(t) for t in ctx.recipe.targets]
    result = lower_all(model, profiles, ctx.data, calibration, out, ctx.recipe.calibrate.sensitivity
                       and ctx.data.val.y is not None)
    if ctx.recipe.calibrate.compare_methods and ctx.data.val.y is not None:
        teacher, _ = load_model(ctx.stage_dir("teacher") / "model.pt")
        result["calibration_methods_on_teacher"] = {
            "float_test_accuracy": top1(predict(teacher, ctx.data.test.x), ctx.data.test.y),
            "by_backend": compare_methods(teacher, profiles, ctx.data, calibration)}
    np.savez(out / "golden.npz", x=ctx.data.test.x[:GOLDEN_SAMPLES],
             y=predict(model, ctx.data.test.x[:GOLDEN_SAMPLES]))
    (out / "targets.json").write_text(json.dumps(result["targets"], indent=1, default=str))
    return result
