"""The model-zoo check (``pytest -m zoo``, ``make zoo``): architectures from the libraries people use, each built
from its library (``pretrained=False`` / a config), trained briefly here, handed in as ``zoo_models:NAME`` with
``--weights``, started with ``edge-pipeline init`` and run post-training to the three int8 targets.

Each run must end with exit 0 or 1 (never an internal failure), score the teacher exactly as the model called by
keyword does, and give every failed target a reason naming the check, op or layer. The figures of each run are
appended to ``$EDGE_PIPELINE_ZOO_OUT`` (JSON lines) when it is set: BENCHMARKS.md's model x runtime table.
"""

import json
import os

import numpy as np
import pytest
import torch
import yaml
import zoo_models as zm
from edge_support import run_cli

pytestmark = pytest.mark.zoo

INT8 = ["executorch-xnnpack-int8", "ort-mobile-int8", "tflite-int8"]
FP32 = {t: t.replace("-int8", "-fp32") for t in INT8}  # built too when figures are recorded: the p50 ratio
# name: (data source, training epochs). Ordered for two workers (``make zoo``: the first two tests go to one, the
# next two to the other, the rest to whichever is free): the longest run first, the shortest queued behind it.
MODELS = {
    "efficientvit_m0": ("zoo_models:photo_crops", 15),
    "bert_tiny": ("zoo_models:token_items", 20),
    "tv_mobilenet_v3_small": ("zoo_models:photo_crops", 15),
    "mobilevit_xxs": ("zoo_models:photo_crops", 15),
    "mobilenetv3_small_100": ("zoo_models:photo_crops", 15),
}


def _keyword_metric(name: str, weights, source: str) -> float:
    """The trained model's top-1 on the test split, called by keyword with the data's own keys."""
    from edge_pipeline.interface import flatten_outputs
    from edge_pipeline.sources import load_data

    model = getattr(zm, name)()
    model.load_state_dict(weights)
    data = load_data(source)
    names = data.input_names or ["x"]
    correct = 0
    with torch.no_grad():
        for inputs, y in data.test.batches(64):
            if data.input_names:
                out = model(**{k: torch.from_numpy(a) for k, a in zip(names, inputs, strict=True)})
            else:
                out = model(*map(torch.from_numpy, inputs))
            correct += int((flatten_outputs(out)[1][0].argmax(1).numpy() == y).sum())
    return correct / len(data.test)


@pytest.mark.parametrize("name", MODELS)
def test_a_library_model_runs_init_then_int8_on_all_three_runtimes(name, tmp_path):
    source, epochs = MODELS[name]
    out = os.environ.get("EDGE_PIPELINE_ZOO_OUT")
    targets = INT8 + (list(FP32.values()) if out else [])
    weights = zm.train_briefly(getattr(zm, name)(), source, epochs)
    torch.save(weights, tmp_path / f"{name}.pt")
    recipe = tmp_path / f"{name}.yaml"
    args = ["init", "--model", f"zoo_models:{name}", "--weights", tmp_path / f"{name}.pt", "--data", source,
            "--out", recipe]
    res = run_cli(*args, *[a for t in targets for a in ("--targets", t)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = yaml.safe_load(recipe.read_text())
    # Post-training int8 as a user would switch it on in the starter recipe (prune and distill are tested on a
    # timm model below; here each architecture meets the three int8 converters).
    doc.update(prune={"enabled": False}, distill={"enabled": False}, device_test={"runs": 10, "warmup": 2},
               package={"enabled": False}, output=str(tmp_path / "runs"))
    doc["calibrate"]["samples"] = 128
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = run_cli("run", recipe, cwd=tmp_path, timeout=1500)
    assert res.returncode in (0, 1), res.stderr[-4000:]
    run_dir = tmp_path / "runs" / name / "default"
    run = json.loads((run_dir / "run.json").read_text())
    teacher = run["stages"]["teacher"]["metrics"]["test_metric"]
    assert teacher == pytest.approx(_keyword_metric(name, weights, source)), "the pipeline scores the model as "\
        "the model called by keyword does"
    lowered = run["stages"]["lower"]["metrics"]["targets"]
    devices = run["stages"]["device-test"]["metrics"]["results"]
    rows = []
    for target in INT8:
        t = lowered[target]
        if t.get("failures"):
            assert all(isinstance(f, str) and f for f in t["failures"]) and "{'" not in str(t["failures"]), t
        if any(f.startswith(("parity:", "accuracy drop")) for f in t.get("failures", [])):
            assert any(f.startswith("int8 diagnosis:") for f in t["failures"]), "an int8 miss names its layers"
        assert (run_dir / "report.html").is_file()
        if "error" in t:
            assert t.get("where"), f"{target}: a lowering failure names its op or layer: {t['error']}"
            rows.append({"target": target, "error": t["error"], "where": t["where"]})
            continue
        local = devices[target]["local"]
        fp32 = devices.get(FP32[target], {}).get("local", {}).get("latency", {}).get("p50_ms")
        rows.append({"target": target, "test_metric": t["test_metric"], "drop": t["metric_drop"],
                     "agreement": t["agreement_with_teacher"].get("top1_agreement"),
                     "p50_ms": local["latency"]["p50_ms"], "p50_ratio": fp32 and local["latency"]["p50_ms"] / fp32,
                     "failures": t["failures"] + local.get("failures", []),
                     "float_for_lowering": t.get("float_for_lowering"), "fallback": t.get("fallback"),
                     "activations": t.get("activations")})
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"model": name, "fp32": teacher, "targets": rows}) + "\n")
    shipped = [r for r in rows if "error" not in r]
    assert len(shipped) >= 2, f"{name}: at most one runtime may refuse the model: {rows}"


def test_a_timm_model_with_read_only_properties_goes_through_prune_distill_and_lower(tmp_path):
    """timm's ConvNormAct has read-only properties (in_channels): the pruned and distilled model is saved and
    loaded between stages without setting them."""
    weights = zm.train_briefly(zm.mobilenetv3_small_100(), "zoo_models:photo_crops", 6)
    torch.save(weights, tmp_path / "w.pt")
    recipe = tmp_path / "mnv3.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mnv3", "model": "zoo_models:mobilenetv3_small_100", "weights": str(tmp_path / "w.pt"),
        "data": "zoo_models:photo_crops", "prune": {"max_macs": 0.6, "iterative_steps": 1, "finetune_epochs": 1},
        "distill": {"student": "pruned", "epochs": 2}, "calibrate": {"samples": 64},
        "targets": ["executorch-xnnpack-int8"], "device_test": {"enabled": False}, "package": {"enabled": False},
        "output": str(tmp_path / "runs")}))
    res = run_cli("run", recipe, cwd=tmp_path, timeout=1500)
    assert res.returncode in (0, 1), res.stderr[-4000:]
    run = json.loads((tmp_path / "runs" / "mnv3" / "default" / "run.json").read_text())
    assert run["stages"]["prune"]["metrics"]["macs_fraction"] <= 0.6
    target = run["stages"]["lower"]["metrics"]["targets"]["executorch-xnnpack-int8"]
    assert "error" not in target and np.isfinite(target["test_metric"]), target.get("error")
