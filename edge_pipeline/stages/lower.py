"""The lower stage: lower the model to every target profile, then check each artifact in its own runtime.

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
from edge_pipeline.backends import artifact_bytes, artifact_gzip_bytes, artifact_weights, get_backend, pt2e, spec
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator, agreement, example_inputs, predict, run_artifact
from edge_pipeline.interface import FlatModel, ModelInterface, flat_name, unwrap
from edge_pipeline.layer_error import combined_db, noise_shares, output_sensitivity, row_range_spread
from edge_pipeline.rounding import round_layer, second_moments, with_weights
from edge_pipeline.stages import Stage
from edge_pipeline.targets import Profile, load_profile, targets_config

GOLDEN_SAMPLES = 32
LAYER_ERROR_ROWS = 32  # validation rows the per-layer debuggers log (ORT's holds every tensor in memory)
# A layer goes back to float only when it adds at least this share of the int8 noise of all layers. On
# EfficientNet-Lite0 the worst of 50 layers adds about 10%: keeping it float did not change agreement on val,
# and each try cost a full export (a minute for ExecuTorch).
MIN_NOISE_SHARE = 0.2
# The accuracy fallback's per-inference build ships only if its host p50 is at most this many times the static
# build's: a briefly trained MobileNetV3's were about 0.6-1.1x (ORT, LiteRT, ExecuTorch); EfficientNet-Lite0's
# LiteRT file 4.5x.
DYNAMIC_MAX_SLOWDOWN = 1.5
# A Conv/Linear input whose largest representative row reaches this many times the median row's peak
# (``layer_error.row_range_spread``) gets the per-inference build tried. Measured on the representative rows:
# EfficientNet-Lite0 (published weights, ImageNet photos) 1.8, BERT-tiny 1.6, EfficientViT-M0 3.9, MobileViT-XXS 5.2
# (all within a point in static int8); briefly trained MobileNetV3s 14.5 (torchvision) and 67 (timm).
ROW_SPREAD_LIMIT = 8.0
# A layer that alone makes at least this share of the int8 noise (``output_sensitivity``), and alone takes the
# outputs under DOMINANT_MAX_DB, is tried in float even where static int8 passes on val: one float layer is a cheap
# fix where it is the cause. EfficientViT-M0's depthwise conv after a patch merge made 61% at 34 dB (its ExecuTorch
# and ORT builds passed on 120 val crops and agreed with float on 94.2% of the test crops; the trial did not bring
# them closer on val: their noise is made between the layers, ``UNEXPLAINED_NOISE_DB``). BERT-tiny's
# classifier made all of it at 61 dB: not worth a float layer.
DOMINANT_NOISE_SHARE = 0.5
DOMINANT_MAX_DB = 40.0
# Where static int8's outputs on val are this many dB further from float than its Conv/Linear layers' int8 alone
# takes them (``output_sensitivity``, all layers' noise together), the noise is made between layers: a residual
# stream whose few large channels set one int8 range for all (EfficientViT-M0: channel peaks 22 against a median
# of 2.9), or attention's products. The per-inference build, which quantizes only the layers' inputs, is tried
# there whatever val says. Measured: EfficientViT-M0 11.5 dB against 31.9 predicted (its per-inference ORT file:
# 44.5 dB); EfficientNet-Lite0 on ImageNet photos 18.7 against 19.0 (ExecuTorch, LiteRT), 14.6 on the 7-bit-weight
# x86 ORT file, which the 8-bit measure does not model.
UNEXPLAINED_NOISE_DB = 10.0


def locate_failure(model: nn.Module, example: tuple[torch.Tensor, ...],
                   err: BaseException) -> tuple[str, str | None, str | None]:
    """The op a backend refused and the module it sits in, found by matching the exported graph's ops
    against the error text (e.g. 'STABLEHLO_SORT' names aten.sort, 'edgetest::mystery' a custom op).
    Returns the error's text, where it is (a sentence) and the module's path (None where unknown)."""
    text = f"{type(err).__name__}: {err}"
    try:
        ep = torch.export.export(model, example)
    except Exception:  # noqa: BLE001 - the model may not export at all; then the message is all we have
        return text, None, None
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
        path = pt2e.module_path(node) or node.name
        where = "" if path == "model" else path.removeprefix("model.")  # paths inside FlatModel
        return text, f"op {op} in module '{where or '(top level)'}'", where or None
    m = re.search(r"([A-Za-z_]+::[A-Za-z_0-9.]+|aten\.[A-Za-z_0-9.]+)", text)
    return text, f"op {m.group(1)}" if m else None, None


def same_kind(model: nn.Module, layer: str) -> list[str]:
    """Every module of the same class as this one (all attention blocks where one failed), by path."""
    kind = type(unwrap(model).get_submodule(layer))
    return [n for n, m in unwrap(model).named_modules() if type(m) is kind and n]


class Reference:
    """What every target of one lower stage is measured against: the float model it came from (parity, on the
    full test split) and the recipe's metric of that model (the accuracy drop)."""

    def __init__(self, model: nn.Module, ev: Evaluator):
        self.ev = ev
        self.val, self.test = predict(model, ev.data.val), predict(model, ev.data.test)
        self.val_metric = ev.score_outputs(self.val, "val")
        self.test_metric = ev.score_outputs(self.test, "test")
        self.model = model
        self._moments: dict | None = None
        self._rounded: dict[tuple[str, int], torch.Tensor | None] = {}
        self._int8_models: dict[frozenset, tuple[nn.Module, int]] = {}
        self._spread: tuple | None = None
        self._sensitivity: dict[str, float] | None = None

    def layer_sensitivity(self, calibration) -> dict[str, float]:
        """``output_sensitivity`` of the float model on the first val rows, once per stage."""
        if self._sensitivity is None:
            val = self.ev.data.val
            self._sensitivity = output_sensitivity(self.model, calibration,
                                                   val.rows(np.arange(min(LAYER_ERROR_ROWS, len(val)))))
        return self._sensitivity

    def row_spread(self, calibration) -> tuple[str, float] | None:
        """``layer_error.row_range_spread`` of the float model on the representative set, once per stage."""
        if self._spread is None:
            self._spread = (row_range_spread(self.model, calibration),)
        return self._spread[0]

    def int8_model(self, calibration, grid) -> tuple[nn.Module, int]:
        """The float model with the weights of the layers ``grid(name, module)`` gives a grid (its +-qmax) rounded
        on the representative set (``rounding``; the inputs' second moments computed once for every target of
        the stage), and how many. One copy per set of layers and grids, so the builds that share it share its
        export (``pt2e.export_for_calibration``)."""
        if self._moments is None:
            self._moments = second_moments(self.model, calibration)
        layers = dict(self.model.named_modules())
        chosen = {n: q for n in self._moments if (q := grid(n, layers[n]))}
        key = frozenset(chosen.items())
        if key not in self._int8_models:
            for n, q in chosen.items():
                if (n, q) not in self._rounded:
                    self._rounded[n, q] = round_layer(layers[n].weight, self._moments[n], q)
            weights = {n: self._rounded[n, q] for n, q in chosen.items() if self._rounded[n, q] is not None}
            self._int8_models[key] = (with_weights(self.model, weights), len(weights))
        return self._int8_models[key]

    def float_metrics(self) -> dict:
        """The float model's metric, and what int8 weights alone (activations float) reach: the honest ceiling
        each int8 target is compared with."""
        from edge_pipeline.layer_error import int8_weights_only

        weights_only = predict(int8_weights_only(self.model), self.ev.data.test)
        return {"metric": self.ev.metric.name, "val_metric": self.val_metric, "test_metric": self.test_metric,
                "int8_weights_only_test_metric": self.ev.score_outputs(weights_only, "test")}


def evaluate(path: Path, ref: Reference, profile: Profile, parity_reference: list[np.ndarray] | None = None) -> dict:
    """An artifact run in its own runtime over val and test, scored, and compared output by output with the
    model it came from on the whole test split (parity): the float model, or for a QAT build the trained int8
    graph in PyTorch (``parity_reference``; QAT changed the weights, so the float model is not its source)."""
    ev = ref.ev
    val = run_artifact(path, ev.data.val, profile.threads)
    test = run_artifact(path, ev.data.test, profile.threads)
    parity = agreement(test, ref.test if parity_reference is None else parity_reference, ev.names)
    misses = parity_misses(parity, profile, ev.metric.output)
    # The same tolerances on val, where the float fallback decides: a few dozen val rows can show no metric drop
    # where outputs already moved (EfficientNet-Lite0's x86 ORT file: no drop on 50 val photos, 1.7 points and
    # cosine 0.978 on the test photos). A QAT build's val reference is not computed: it has no fallback.
    val_parity = agreement(val, ref.val, ev.names) if parity_reference is None else None
    test_metric = ev.score_outputs(test, "test")
    return {"size_bytes": artifact_bytes(path), "parity": parity, "parity_ok": not misses, "parity_misses": misses,
            "val_parity": val_parity and val_parity["worst"],
            "val_parity_misses": parity_misses(val_parity, profile, ev.metric.output) if val_parity else [],
            "metric": ev.metric.name, "val_metric": ev.score_outputs(val, "val"), "test_metric": test_metric,
            "metric_drop": ev.metric.drop(test_metric, ref.test_metric),
            "agreement_with_teacher": agreement(test, ev.reference("test"), ev.names)["worst"]}


def lower_target(model: FlatModel, iface: ModelInterface, profile: Profile, ref: Reference,
                 calibration: tuple[np.ndarray, ...], out: Path, sensitivity: bool = True,
                 qat: dict | None = None, keep_float: tuple[str, ...] = ()) -> dict:
    """Export one target (with the float fallback when its budget on the recipe's metric is missed) and check it.
    With ``qat`` (a QAT run's trained state) the QAT build is made beside the post-training one, and the
    better of the two on val ships."""
    backend = get_backend(profile.backend)
    example = example_inputs(ref.ev.data)
    tdir = out / profile.name
    metric = ref.ev.metric

    def build(float_layers, folder: Path = tdir, trained: dict | None = None,
              activations: str = "static") -> tuple[Path, dict]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # Golden-I/O fixtures come once, for the build that ships (below), not for every trial.
        extra = {"qat": trained} if trained is not None else {}
        if activations != "static":
            extra["activations"] = activations
        exported, rounded = model, 0
        grid = getattr(backend, "int8_weight_grid", None)
        chosen = grid(profile, activations) if grid and profile.precision == "int8" and trained is None else None
        if chosen is not None:  # int8 weights rounded on the data; the fallback's float layers keep theirs
            floats = {flat_name(layer) for layer in float_layers}
            exported, rounded = ref.int8_model(calibration,
                                               lambda name, module: name not in floats and chosen(name, module))
        path = backend.export(exported, example, calibration, profile, folder, iface, float_layers=float_layers,
                              fixtures=False, **extra)
        source = None if trained is None else pt2e.qat_outputs(model, calibration, backend.qat_quantizer(profile),
                                                               trained, ref.ev.data.test)
        return path, {**evaluate(path, ref, profile, source), "weights_rounded_on_data": rounded}

    def better(a: float, b: float) -> bool:
        return a > b if metric.higher_is_better else a < b

    def missed(m: dict) -> bool:
        drop = metric.drop(m["val_metric"], ref.val_metric)
        return bool(m["val_parity_misses"]) or drop is not None and drop > profile.budgets.max_accuracy_drop

    def improves(trial: dict, current: dict) -> bool:
        """Better on val by the metric without moving the outputs further from float (worst cosine), or as good
        by the metric and closer to float. A metric over a few dozen val rows moves by one row: EfficientNet-Lite0's
        x86 ORT file with its first depthwise conv in float scored one val photo more while its outputs moved away
        from float (test cosine 0.976 -> 0.940, test top-1 -0.9 point). A trial that meets the budgets on val where
        the current build misses them wins outright: a static MobileNetV3 file scored one val photo above float with
        its outputs at cosine 0.957, and lost to it the per-inference build at cosine 0.998 one photo lower. Where the
        current build meets them but static int8 is ``fragile`` (below), a trial must meet them with its outputs
        closer to float."""
        if missed(current) and not missed(trial):
            return True
        if not missed(current) and fragile:  # static int8 passed on val but is fragile (below)
            return not missed(trial) and trial["val_parity"]["cosine"] > current["val_parity"]["cosine"]
        closer = trial["val_parity"]["cosine"] - current["val_parity"]["cosine"]
        if trial["val_metric"] != current["val_metric"]:
            return better(trial["val_metric"], current["val_metric"]) and closer >= 0
        return closer > 0

    path, metrics = build(keep_float)
    activations, static_build = "static", None
    int8 = profile.precision == "int8"
    mixed = backend.BACKEND.float_layers
    float_layers: list[str] = list(keep_float)
    errors = None
    all_int8 = {k: metrics[k] for k in ("size_bytes", "val_metric", "val_parity")}
    comparison = None
    # Where the representative rows need int8 ranges far apart, static int8 is fragile even where it passes on val
    # (torchvision's MobileNetV3 at a spread of 14: its ORT and LiteRT builds scored above float on 120 val crops
    # and agreed with it on 93% of the test crops): the per-inference build is tried there whatever val says.
    row_spread = ref.row_spread(calibration) if int8 and qat is None else None
    wide_rows = bool(row_spread and row_spread[1] >= ROW_SPREAD_LIMIT and sensitivity
                     and backend.BACKEND.dynamic_activations)
    # And where the noise is made between the layers (``UNEXPLAINED_NOISE_DB``): (val SQNR, what the layers predict).
    between = None
    if int8 and qat is None and sensitivity and backend.BACKEND.dynamic_activations and metrics.get("val_parity"):
        predicted, actual = combined_db(ref.layer_sensitivity(calibration)), metrics["val_parity"]["sqnr_db"]
        between = (actual, predicted) if predicted - actual >= UNEXPLAINED_NOISE_DB else None
    # Likewise where one layer makes most of the int8 noise: one float layer is a cheap fix. Not where the noise is
    # made between the layers: there the layers' shares say nothing about it (EfficientViT-M0's 61% layer in float
    # left its ExecuTorch and ORT builds where they were, at the cost of one more export: 132 s for ExecuTorch).
    dominant, output_db = None, None
    if (int8 and qat is None and sensitivity and mixed and profile.quantization.max_float_layers > len(keep_float)
            and not missed(metrics) and profile.budgets.max_accuracy_drop is not None and not between):
        output_db = {n: db for n, db in ref.layer_sensitivity(calibration).items()
                     if n not in keep_float}
        worst = min(output_db, key=output_db.get) if output_db else None
        if worst and noise_shares(output_db)[worst] >= DOMINANT_NOISE_SHARE and output_db[worst] < DOMINANT_MAX_DB:
            dominant = worst
    fragile, fragile_reason = [], None
    if wide_rows:
        fragile.append(f"the representative rows' ranges are {row_spread[1]:.0f}x apart at '{row_spread[0]}'")
    if dominant:
        fragile.append(f"'{dominant}' alone makes {noise_shares(output_db)[dominant]:.0%} of the int8 noise")
    if between:
        fragile.append(f"its outputs on val are at {between[0]:.1f} dB where its Conv/Linear layers' int8 alone "
                       f"takes them to {between[1]:.1f} dB")
    if int8 and qat is not None:
        trial = out / f".{profile.name}.trial"
        qat_path, qat_metrics = build((), trial, trained=qat)
        comparison = {"ptq": _comparison_entry(path, metrics, example, profile),
                      "qat": _comparison_entry(qat_path, qat_metrics, example, profile)}
        # The build that meets its budgets (parity, size, accuracy); of two that do, or neither, the better on val.
        # A tie keeps the calibrated build.
        ptq_ok, qat_ok = (not budget_failures(profile, m) for m in (metrics, qat_metrics))
        use_qat = qat_ok and not ptq_ok or (qat_ok == ptq_ok and better(qat_metrics["val_metric"],
                                                                         metrics["val_metric"]))
        comparison["shipped"] = "qat" if use_qat else "ptq"
        if use_qat:
            shutil.rmtree(tdir)
            trial.rename(tdir)
            path, metrics = tdir / qat_path.name, qat_metrics
        else:
            shutil.rmtree(trial)
        comparison["ptq"]["meets_budgets"], comparison["qat"]["meets_budgets"] = ptq_ok, qat_ok
        progress.note(f"{profile.name}: {comparison['shipped'].upper()} ships ({metric.name} on val: PTQ "
                      f"{comparison['ptq']['val_metric']:.4f}, QAT {comparison['qat']['val_metric']:.4f}; budgets met: "
                      f"PTQ {'yes' if ptq_ok else 'no'}, QAT {'yes' if qat_ok else 'no'})")
    elif int8 and profile.budgets.max_accuracy_drop is not None and (missed(metrics) or fragile):
        # Why a build that passed on val was tried against others (recorded on the build that ships, below).
        fragile_reason = "; ".join(fragile) if fragile and not missed(metrics) else None
        exports, candidates = 1, []
        if missed(metrics) and not mixed:
            metrics["fallback"] = {"unsupported": backend.BACKEND.refusal("float_layers")
                                                  + "; the miss is reported as is"}
        elif dominant and not missed(metrics):  # one trial: that layer in float
            candidates = [dominant]
        elif missed(metrics) and sensitivity:
            # Accuracy-aware fallback, decided on the validation split (metric drop and parity): the layers whose
            # int8 hurts the outputs most go back to float one at a time, each confirmed by a rebuild, until the
            # budgets are met or a layer does not help: at most 1 + max_float_layers exports. The runtime's own
            # debugger's per-layer error (where noise is made, on one calibrated build) is recorded beside it.
            val = ref.ev.data.val
            rows = val.rows(np.arange(min(LAYER_ERROR_ROWS, len(val))))
            try:
                errors = (backend.layer_errors(model, example, calibration, rows, profile, iface)
                          if backend.BACKEND.layer_errors else {})
            except Exception as e:  # noqa: BLE001 - a diagnostic that fails costs the fallback, not the target
                metrics["fallback"] = {"unsupported": f"per-layer error failed: {type(e).__name__}: "
                                                      f"{str(e).splitlines()[0][:300]}"}
                errors = {}
            # Tried in the order of what each layer alone in int8 does to the outputs: an early layer of a
            # network that amplifies noise makes little of its own and costs the most.
            output_db = ref.layer_sensitivity(calibration)
            candidates, spread = fallback_candidates(output_db, profile.quantization.max_float_layers)
            if spread:
                metrics["fallback"] = {"not_tried": spread}
        for candidate in candidates:
            if not missed(metrics) and candidate != dominant:
                break
            # Confirmed by a rebuild: the layer stays float only if it does better on val.
            trial = out / f".{profile.name}.trial"
            try:
                trial_path, trial_metrics = build(tuple(float_layers) + (candidate,), trial)
            except Exception as e:  # noqa: BLE001 - a trial that cannot be built costs the fallback, not the target
                shutil.rmtree(trial, ignore_errors=True)
                said = (str(e).splitlines() or [""])[0][:300]
                metrics["fallback"] = {"unsupported": f"keeping '{candidate}' in float failed to build: "
                                                      f"{type(e).__name__}: {said}"}
                break
            exports += 1
            if improves(trial_metrics, metrics):
                float_layers.append(candidate)
                shutil.rmtree(tdir)
                trial.rename(tdir)
                path, metrics = tdir / trial_path.name, trial_metrics
                progress.note(f"{profile.name}: '{candidate}' kept in float ({metric.name} on val "
                              f"{metrics['val_metric']:.4f})")
            else:  # the most harmful layer left did not help: the less harmful ones will not either
                shutil.rmtree(trial)
                break
        if (missed(metrics) or wide_rows or between) and sensitivity and backend.BACKEND.dynamic_activations:
            # Static int8 spends one calibrated range per tensor on every row. Where rows need ranges far
            # apart (a briefly trained MobileNetV3: activations 20x larger on one class's photos than on the
            # rest) the small rows keep a few steps, noise is spread over all layers and no float layer
            # helps; a scale per row, computed at run time, serves each. Tried where static int8 misses on val,
            # where the rows' ranges are that far apart (``wide_rows``) and where the noise is made between the
            # layers (``between``): there it ships if it meets the budgets on val with its outputs closer to
            # float (``improves``).
            trial = out / f".{profile.name}.trial"
            try:
                trial_path, trial_metrics = build(tuple(float_layers), trial, activations="dynamic")
            except Exception as e:  # noqa: BLE001 - a trial that cannot be built costs the fallback, not the target
                shutil.rmtree(trial, ignore_errors=True)
                trial_metrics = None
                said = (str(e).splitlines() or [""])[0][:300]
                metrics["dynamic_activations_failed"] = f"{type(e).__name__}: {said}"
            if trial_metrics is not None:
                exports += 1
                # What the per-inference scales cost on this host: int8 that runs far slower than the static
                # build is not what a user ships (EfficientNet-Lite0's LiteRT file: 21.2 ms against the static
                # build's 5.0 ms and fp32's 9.5 ms, for one val photo).
                price = ({"static_p50_ms": host_p50_ms(path, example, profile.threads),
                          "dynamic_p50_ms": host_p50_ms(trial_path, example, profile.threads)}
                         if improves(trial_metrics, metrics) else None)
                if price and price["dynamic_p50_ms"] <= DYNAMIC_MAX_SLOWDOWN * price["static_p50_ms"]:
                    static_build = {"val_metric": metrics["val_metric"], "val_parity": metrics["val_parity"],
                                    "host_p50_ms": price["static_p50_ms"]}
                    trial_metrics["host_p50_ms"] = price["dynamic_p50_ms"]
                    shutil.rmtree(tdir)
                    trial.rename(tdir)
                    path, metrics = tdir / trial_path.name, trial_metrics
                    activations = "dynamic"
                    progress.note(f"{profile.name}: activations quantized per inference ({metric.name} on val "
                                  f"{metrics['val_metric']:.4f})")
                else:
                    shutil.rmtree(trial)
                    metrics["dynamic_activations_refused"] = (
                        f"activations quantized per inference: {metric.name} on val "
                        f"{trial_metrics['val_metric']:.4f}, cosine {trial_metrics['val_parity']['cosine']:.4f}"
                        + (f"; host p50 {price['dynamic_p50_ms']:.3f} ms against the static build's "
                           f"{price['static_p50_ms']:.3f} ms (more than {DYNAMIC_MAX_SLOWDOWN}x)" if price
                           else "; not better on val"))
        if missed(metrics):
            metrics["fallback_exhausted"] = True
        metrics["fallback_exports"] = exports
    backend.write_fixtures(path, example, iface)
    if comparison is not None:
        metrics["qat"] = comparison
    if errors:
        metrics["layer_error_db"] = errors
    if len(float_layers) > len(keep_float) or activations == "dynamic":  # what the accuracy fallback changed
        metrics["fallback"] = {"float_layers": float_layers[len(keep_float):], "all_int8": all_int8,
                               "size_cost_bytes": metrics["size_bytes"] - all_int8["size_bytes"],
                               "activations": activations}
        if static_build is not None:  # the static build the per-inference one replaced
            metrics["fallback"]["static"] = static_build
    if int8:
        metrics["activations"] = activations
    if fragile_reason:
        metrics["static_int8_fragile"] = fragile_reason
    if output_db is not None:  # what each layer alone in int8 does to the outputs, where the fallback read it
        metrics["layer_sensitivity_db"] = output_db
    if between:
        metrics["noise_between_layers"] = {"val_sqnr_db": round(between[0], 2), "layers_alone_db": round(between[1], 2),
                                           "limit_db": UNEXPLAINED_NOISE_DB}
    if row_spread:
        metrics["activation_row_spread"] = {"layer": row_spread[0], "ratio": round(row_spread[1], 2),
                                            "limit": ROW_SPREAD_LIMIT}
    metrics["float_layers"] = float_layers
    metrics["artifact"] = str(path.relative_to(out))
    metrics["describe"] = backend.describe(path)
    metrics["failures"] = budget_failures(profile, metrics)
    accuracy_missed = metrics["parity_misses"] or profile.budgets.violations(accuracy_drop=metrics["metric_drop"])
    if int8 and qat is None and accuracy_missed:
        metrics["failures"].append(int8_diagnosis(ref, calibration, metrics))
    return metrics


def int8_diagnosis(ref: Reference, calibration, metrics: dict) -> str:
    """Why an int8 build misses its accuracy or parity budget, in one sentence: the layers whose int8 alone hurts
    the outputs most (computed here if the fallback did not), what the fallback did, and what to do."""
    output_db = metrics.get("layer_sensitivity_db")
    if output_db is None:  # the float model's, computed once per stage (``Reference.layer_sensitivity``)
        output_db = metrics["layer_sensitivity_db"] = ref.layer_sensitivity(calibration)
    worst = sorted(output_db, key=output_db.get)[:3]
    shares = noise_shares(output_db)
    named = ", ".join(f"'{n}' ({output_db[n]:.1f} dB alone, {shares[n]:.0%} of the noise)" for n in worst)
    fb = metrics.get("fallback") or {}
    done = ("its float fallback kept " + ", ".join(f"'{n}'" for n in fb["float_layers"]) if fb.get("float_layers")
            else "activations quantized per inference did not recover it" if fb.get("activations") == "dynamic"
            else fb.get("not_tried") or fb.get("unsupported") or
            ("keeping the worst layer in float did not help on val" if metrics.get("fallback_exhausted") else
             "the float fallback did not run (post-training int8 met its budgets on val)"))
    if metrics.get("dynamic_activations_refused"):
        done += f"; tried {metrics['dynamic_activations_refused']}"
    if metrics.get("dynamic_activations_failed"):
        done += f"; the per-inference build failed: {metrics['dynamic_activations_failed']}"
    between = metrics.get("noise_between_layers")
    if between:  # the layers are not where the noise is made: say so before naming them
        return (f"int8 diagnosis: the outputs on val are at {between['val_sqnr_db']:.1f} dB where the Conv/Linear "
                f"layers' int8 alone takes them to {between['layers_alone_db']:.1f} dB: the noise is made between "
                "layers (int8 residual adds or attention products whose tensors have a few large channels); "
                f"{done}. Quantization-aware training (qat.mode: auto) is the remedy")
    return (f"int8 diagnosis: the layers whose int8 alone hurts the outputs most are {named}; {done}. "
            "Where the noise is spread over many layers, quantization-aware training (qat.mode: auto) is the remedy")


def _comparison_entry(path: Path, m: dict, example: tuple[torch.Tensor, ...], profile: Profile) -> dict:
    """What the PTQ-vs-QAT comparison shows of one build: its metric, size and p50 on this host."""
    return {"val_metric": m["val_metric"], "test_metric": m["test_metric"], "metric_drop": m["metric_drop"],
            "size_bytes": m["size_bytes"], "host_p50_ms": host_p50_ms(path, example, profile.threads)}


def host_p50_ms(path: Path, example: tuple[torch.Tensor, ...], threads: int, runs: int = 30) -> float:
    """Median latency of one artifact on this host, by the on-device runner's own measurement: for comparing two
    builds of one target inside one run (device-test measures the shipped one on each device)."""
    from edge_pipeline.harness import runner as harness

    result, _ = harness.measure(str(path), [t.numpy() for t in example], threads, runs=runs, warmup=3)
    return result["latency"]["p50_ms"]


def fallback_candidates(errors_db: dict[str, float], k: int) -> tuple[list[str], str | None]:
    """The layers worth an export in float, worst first (at most ``k``): those that add at least
    ``MIN_NOISE_SHARE`` of the int8 noise. Where even the worst adds less, the noise is spread over many layers,
    a few of them in float cannot recover the miss, and the reason is returned instead."""
    shares = noise_shares(errors_db)
    worst = sorted(errors_db, key=errors_db.get)[:k]
    if worst and shares[worst[0]] < MIN_NOISE_SHARE:
        return [], (f"int8 noise is spread over the layers: the worst, '{worst[0]}', adds {shares[worst[0]]:.0%} "
                    f"of it (a layer is tried in float from {MIN_NOISE_SHARE:.0%})")
    return [n for n in worst if shares[n] >= MIN_NOISE_SHARE], None


def parity_misses(parity: dict, profile: Profile, metric_output: str | None) -> list[str]:
    """Each parity tolerance the artifact misses, as a sentence naming the output, its figure and the bound.
    Top-1 agreement is checked on the output the metric ranks classes of; box or embedding outputs have none."""
    tol, out = profile.budgets.parity, []
    for name, o in parity["outputs"].items():
        if o["cosine"] < tol.min_cosine:
            out.append(f"output '{name}': cosine {o['cosine']:.4f} < min_cosine {tol.min_cosine} "
                       f"(SQNR {o['sqnr_db']:.1f} dB)")
        if tol.max_abs is not None and o["max_abs"] > tol.max_abs:
            out.append(f"output '{name}': max abs error {o['max_abs']:.4g} > max_abs {tol.max_abs}")
    top1 = parity["outputs"][metric_output].get("top1_agreement") if metric_output else None
    if top1 is not None and top1 < tol.min_top1_agreement:
        out.append(f"output '{metric_output}': top-1 agreement {top1:.1%} < min_top1_agreement "
                   f"{tol.min_top1_agreement:.0%}")
    return out


def budget_failures(profile: Profile, m: dict) -> list[str]:
    parity = [f"parity: {miss}" for miss in m.get("parity_misses", [])]
    return parity + profile.budgets.violations(size_bytes=m["size_bytes"], accuracy_drop=m.get("metric_drop"))


def lower_all(model: nn.Module, profiles: list[Profile], ev: Evaluator, calibration, out: Path,
              sensitivity: bool = True, qat_states: dict[str, dict] | None = None) -> dict:
    """Every target profile, each failing alone; ``calibration`` is the representative set's inputs (one array
    or a tuple of them, one row per sample); ``qat_states``: per target, a QAT run's trained state."""
    model = model if isinstance(model, FlatModel) else FlatModel(model)
    calibration = tuple(calibration) if isinstance(calibration, (tuple, list)) else (calibration,)
    iface = ev.iface
    ref = Reference(model, ev)
    targets, failed = {}, []
    with progress.task("lowering", total=len(profiles)) as t:
        for profile in profiles:
            t.advance(0, f"lowering {profile.name}")
            m = _lower_one(model, iface, profile, ref, calibration, out, sensitivity,
                           (qat_states or {}).get(profile.name))
            if m["failures"]:
                failed.append(profile.name)
            targets[profile.name] = {"backend": profile.backend, "precision": profile.precision, **m}
            t.advance()
    return {"float": ref.float_metrics(), "targets": targets, "failed_targets": failed}


def _lower_one(model: FlatModel, iface: ModelInterface, profile: Profile, ref: Reference, calibration, out: Path,
               sensitivity: bool, qat: dict | None) -> dict:
    """One target's metrics, or why it could not be built. Where a runtime's converter refuses an int8 op inside
    a module (LiteRT's int8 batch_matmul in an attention block), every module of that kind is built in float,
    once, and the target says so (``float_for_lowering``); what still fails is reported with its op and module."""
    keep: tuple[str, ...] = ()
    refused = ""
    while True:
        try:
            m = lower_target(model, iface, profile, ref, calibration, out, sensitivity, qat, keep_float=keep)
            if keep:
                m["float_for_lowering"] = {"layers": list(keep), "reason": refused}
            return m
        except PipelineError as e:
            return {"error": str(e), "failures": [str(e)]}
        except Exception as e:  # noqa: BLE001 - a backend refusing the model fails this target only
            tb = traceback.format_exc()[-2000:]
            text, where, layer = locate_failure(model, example_inputs(ref.ev.data), e)
            if (keep or layer is None or profile.precision != "int8"
                    or not spec(profile.backend).float_layers):
                break
            keep = tuple(same_kind(model, layer))
            refused = f"{where}: {text.splitlines()[0][:300]}"
            progress.note(f"{profile.name}: {where} would not lower in int8; {len(keep)} module(s) of its kind "
                          "kept in float")
    described = out / profile.name / "describe.json"
    if where is None and described.is_file():
        # Exported but would not load (e.g. ExecuTorch's "error 0x14", an operator missing from the runtime):
        # the ops that ran outside the delegate are the suspects.
        outside = json.loads(described.read_text()).get("portable_ops")
        where = f"ops outside the delegate: {', '.join(outside)}" if outside else None
    shutil.rmtree(out / profile.name, ignore_errors=True)
    shutil.rmtree(out / f".{profile.name}.trial", ignore_errors=True)
    also = f" (also with the {len(keep)} module(s) of its kind in float)" if keep else ""
    return {"error": f"cannot lower to {profile.backend}: {text.splitlines()[0][:400]}", "where": where,
            "failures": [f"lowering failed{' at ' + where if where else ''}{also}"], "traceback": tb}


def write_golden(path: Path, data) -> None:
    """The first test rows: the golden inputs package runs every shipped artifact on, for verify to re-run."""
    from edge_pipeline.harness import runner as harness

    harness.save_inputs(path, data.test.rows(np.arange(min(GOLDEN_SAMPLES, len(data.test)))))


def run(ctx, out: Path) -> dict:
    model, _ = ctx.model()
    profiles = [load_profile(t) for t in ctx.recipe.targets]
    clustered = ctx.metrics.get("cluster")
    if clustered:  # one int8 scale per clustered layer, so that the file holds each layer's 2^b values
        profiles = [p.model_copy(update={"quantization": p.quantization.model_copy(update={
            "per_tensor_layers": tuple(clustered["clustered_layers"])})}) for p in profiles]
    qat_states = {p.name: state for p in profiles if (state := ctx.qat_state(p.name)) is not None}
    result = lower_all(model, profiles, ctx.evaluator, ctx.calibration(), out, ctx.recipe.calibrate.sensitivity,
                       qat_states)
    for m in result["targets"].values():
        if m.get("artifact"):
            m["download"] = download_facts(out / m["artifact"], clustered)
    write_golden(out / "golden.npz", ctx.data)
    (out / "targets.json").write_text(json.dumps(result["targets"], indent=1, default=str))
    return result


def download_facts(path: Path, clustered: dict | None) -> dict:
    """What a device downloads: the artifact compressed as the release archive is, and the distinct weight
    values read back from the file; with a clustered model, what clustering changed. Also in describe.json."""
    facts = {"bytes": artifact_bytes(path), "gzip_bytes": artifact_gzip_bytes(path),
             "compression": "gzip level 9, as the release .tar.gz", "weights": artifact_weights(path)}
    if clustered:
        facts["clustering"] = (
            f"{clustered['layers']} layers k-means clustered to {'/'.join(map(str, clustered['bits']))} bits: the "
            "runtime computes with dense weights, so it is as fast as unclustered; the weights hold at most 2^b "
            "distinct values per layer (int8 builds give clustered layers one weight scale per tensor where the "
            "backend takes it; else per output channel), which the compressed download shows")
    described = path.parent / "describe.json"
    described.write_text(json.dumps({**json.loads(described.read_text()), "download": facts}, indent=1))
    return facts


def _summary(m: dict) -> str:
    """The count and which targets failed (their figures are in the targets x devices table), what ships."""
    targets = m.get("targets", {})
    failed = [t for t, v in targets.items() if v.get("failures")]
    text = f"{len(targets) - len(failed)} of {len(targets)} targets ok" + (
        f" ({', '.join(failed)} failed: see below)" if failed else "")
    shipped = [f"{t}: {v['qat']['shipped'].upper()}" for t, v in targets.items() if v.get("qat")]
    return text + (f"; ships {', '.join(shipped)}" if shipped else "")


STAGE = Stage("lower", 5, ("teacher", "prune", "distill", "cluster", "calibrate", "qat"),
              lambda r: targets_config(r.targets),
              lambda r: bool(r.targets), command="Lower the model to every target's runtime format.",
              summary=_summary)
