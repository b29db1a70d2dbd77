"""The founding documents' techniques, measured in one run on a recipe (default ``recipes/mobilenet32.yaml``):

1. k-means weight clustering (the cluster stage, linear and density initialisation) against linear weight-only
   quantization (per channel) at the same b = 4 and 6, top-1 on the test split; k-means before and after its
   3-epoch fine-tune;
2. the int8 artifacts' download (gzip level 9, as the release archive compresses) clustered (density
   initialisation) against unclustered;
3. pruning importance: l2, taylor, obd (Optimal Brain Damage) and entropy to the recipe's MAC budget, top-1 after
   the prune stage's fine-tune (val, as the stage reports it, and test).

Usage: ``python scripts/cluster_compare.py [RECIPE] [--out DIR]``; prints a JSON document and markdown tables.
All runs share one run folder, so the teacher is trained once and each variant re-runs only what it changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from edge_pipeline import clustering
from edge_pipeline.evaluation import predict
from edge_pipeline.modelio import load_model
from edge_pipeline.pipeline import Context, run
from edge_pipeline.recipe import load_recipe
from edge_pipeline.runstore import RunStore
from edge_pipeline.stages import stage_names

BITS = (4, 6)
IMPORTANCE = ("l2", "taylor", "obd", "entropy")
INITS = ("linear", "density")


def _top1(model, split) -> float:
    return float((predict(model, split)[0].argmax(1) == split.y).mean())


def _linear(model, layers: list[str], bits: int):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in layers:
            mods[name].weight.copy_(clustering.linear_codebook(mods[name].weight, bits))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default="recipes/mobilenet32.yaml")
    ap.add_argument("--out", default="runs/cluster-compare")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.recipe).read_text())
    base.update(output=str(out / "runs"), device_test={"enabled": False}, package={"enabled": False})
    recipe_path = out / "recipe.yaml"

    def go(until: str, **changes) -> dict:
        doc = {**base, **changes}
        recipe_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        t0 = time.time()
        summary = run(recipe_path, run_id="compare", until=until)
        doc = json.loads((summary.run_dir / "run.json").read_text())
        doc["seconds"] = time.time() - t0
        return doc

    started = time.time()
    plain = go("lower", cluster={"enabled": False})
    run_dir = Path(plain["run_dir"])
    ctx = Context(load_recipe(recipe_path), str(recipe_path), RunStore(out / "runs", base["name"], "compare",
                                                                     stage_names()))
    test = ctx.data.test
    distilled, _ = load_model(run_dir / "02-distill" / "model.pt")
    example = tuple(torch.from_numpy(a[:1]) for a in ctx.data.example)
    _pairs, heads = clustering.graph_facts(distilled, example)
    layers = clustering.clusterable(distilled, [], heads, True, "compare")
    result = {"recipe": args.recipe, "distilled_test_top1": _top1(distilled, test), "layers": len(layers),
              "linear": {}, "kmeans": {}, "download": {}, "importance": {}}
    for bits in BITS:
        model, _ = load_model(run_dir / "02-distill" / "model.pt")
        result["linear"][bits] = _top1(_linear(model, layers, bits), test)
        for init in INITS:  # the default (density) last: its lower stage gives the download figures
            clustered = go("lower", cluster={"enabled": True, "bits": bits, "epochs": 3, "init": init})
            cl = clustered["stages"]["cluster"]["metrics"]
            result["kmeans"].setdefault(bits, {})[init] = {
                "before_fine_tune": cl["test_metric_clustered"], "fine_tuned": cl["test_metric"],
                "epochs": cl["epochs_run"], "max_distinct": cl["max_distinct_weights"]}
        for name, t in clustered["stages"]["lower"]["metrics"]["targets"].items():
            ref = plain["stages"]["lower"]["metrics"]["targets"][name]
            result["download"].setdefault(name, {"unclustered": {"bytes": ref["download"]["bytes"],
                                                                  "gzip_bytes": ref["download"]["gzip_bytes"],
                                                                  "test_metric": ref.get("test_metric")}})
            result["download"][name][bits] = {"bytes": t["download"]["bytes"],
                                              "gzip_bytes": t["download"]["gzip_bytes"],
                                              "test_metric": t.get("test_metric")}
    for imp in IMPORTANCE:
        pruned = go("prune", cluster={"enabled": False}, prune={**base.get("prune", {}), "importance": imp})
        pm = pruned["stages"]["prune"]["metrics"]
        model, _ = load_model(run_dir / "01-prune" / "model.pt")
        result["importance"][imp] = {"macs_fraction": pm["macs_fraction"], "val_finetuned": pm["val_metric_finetuned"],
                                     "test_finetuned": _top1(model, test), "seconds": pruned["seconds"]}
    result["seconds"] = time.time() - started
    print(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"distilled model: test top-1 {r['distilled_test_top1']:.2%}; {r['layers']} layers clustered "
             "(every Conv/Linear but the output head)", "",
             "| b | linear weight-only (per channel) | " + " | ".join(
                 f"k-means ({i} init), before fine-tune | k-means ({i} init), fine-tuned" for i in INITS) + " |",
             "|---|---|" + "---|---|" * len(INITS)]
    for bits in BITS:
        k = r["kmeans"][bits]
        cells = [f"{k[i]['before_fine_tune']:.2%} | {k[i]['fine_tuned']:.2%} ({k[i]['epochs']} epochs)" for i in INITS]
        lines.append(f"| {bits} | {r['linear'][bits]:.2%} | " + " | ".join(cells) + " |")
    lines += ["", "| target | unclustered B | gzip B | " + " | ".join(f"b={b} B | b={b} gzip B | gzip ratio"
                                                               for b in BITS) + " |",
              "|---|---|---|" + "---|---|---|" * len(BITS)]
    for name, d in r["download"].items():
        u = d["unclustered"]
        cells = [f"{d[b]['bytes']} | {d[b]['gzip_bytes']} | {d[b]['gzip_bytes'] / u['gzip_bytes']:.3f}" for b in BITS]
        lines.append(f"| {name} | {u['bytes']} | {u['gzip_bytes']} | " + " | ".join(cells) + " |")
    lines += ["", "| importance | MACs kept | val top-1 after fine-tune | test top-1 |", "|---|---|---|---|"]
    for imp, d in r["importance"].items():
        lines.append(f"| {imp} | {d['macs_fraction']:.1%} | {d['val_finetuned']:.2%} | {d['test_finetuned']:.2%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
