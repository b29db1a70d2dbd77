"""``edge-pipeline init``: a starter recipe for the user's own model and data.

The model and data are loaded once and checked exactly as a run checks them (data labels and values, the model on
an example batch, its inputs and outputs), so a recipe that ``init`` writes starts; the interface it found is
written into the recipe as comments. Labelled data gets the whole pipeline (prune to half the MACs, distill,
int8); unlabelled data gets post-training int8 only, scored by agreement with the float model.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from edge_pipeline.errors import PipelineError


def default_targets() -> list[str]:
    """Every backend's built-in int8 and fp32 profiles."""
    from edge_pipeline.backends import backends

    return [t for b in backends().values() for t in b.BACKEND.targets]


def default_name(model: str) -> str:
    """The recipe's name (and file name) from the model source: its callable or file name."""
    base = model.rsplit(":", 1)[-1].rsplit("/", 1)[-1].removesuffix(".pt").removesuffix(".pt2")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"


def starter_recipe(model: str, data: str, targets: list[str] | None = None, name: str | None = None,
                   weights: str | None = None) -> str:
    """The recipe's YAML text, checked: the same validation and preflight a run does. ``weights`` is written as
    given (relative to the recipe's folder when relative)."""
    from edge_pipeline.pipeline import Context
    from edge_pipeline.recipe import parse_recipe
    from edge_pipeline.sources import load_data

    name = name or default_name(model)
    loaded = load_data(data, where="--data")
    labelled = loaded.train.y is not None
    doc = {"name": name, "description": f"{name}, from edge-pipeline init", "model": model,
           **({"weights": weights} if weights else {}), "data": data}
    if labelled:
        doc |= {"prune": {"max_macs": 0.5, "iterative_steps": 2, "finetune_epochs": 3},
                "distill": {"student": "pruned", "alpha": 0.7, "temperature": 4.0, "epochs": 30}}
    else:  # the float model's own top-1 (one output) or cosine (several) is the reference
        doc |= {"prune": {"enabled": False}, "distill": {"enabled": False}}
    doc |= {"calibrate": {"set": f"calibration/{name}-256", "samples": 256},
            "targets": list(targets or default_targets()), "devices": ["local"], "package": {"version": "0.1.0"}}
    ctx = Context(parse_recipe(doc, "edge-pipeline init"), "edge-pipeline init", store=None)
    ctx.loaded_data = loaded  # loaded once, above
    ctx.preflight()  # what a run checks before any work: data, the model on an example batch, prune and distill
    if not labelled and len(ctx.iface.outputs) == 1 and len(ctx.iface.outputs[0].shape) == 1:
        doc = {**doc, "metric": "agreement"}  # class scores: top-1 agreement with the float model
    iface, metric = ctx.iface, ("agreement" if doc.get("metric") else ctx.metric.name)
    rows = len(loaded.train) + len(loaded.val) + len(loaded.test)
    io = [f"#   input  {s.name}: {list(s.shape)} {s.dtype}" for s in iface.inputs]
    if loaded.input_names and loaded.input_names != iface.input_names:
        io.insert(0, f"#   (the data's keys {', '.join(loaded.input_names)} go to forward's parameters by name, "
                     f"in forward's order)")
    io += [f"#   output {s.name}: {list(s.shape)} {s.dtype}" for s in iface.outputs]
    head = [f"# Written by `edge-pipeline init`: {name} on {data} ({rows} samples, "
            f"{'labelled' if labelled else 'no labels'}; metric: {metric}).",
            "# The model's interface, found on an example batch (batch dimension left out):", *io,
            "# Labelled data: prune to half the MACs, distill into the pruned student, then int8." if labelled else
            "# No labels: post-training int8 only, scored against the float model's own outputs.",
            "# Relative paths are relative to this file. Budgets live in the target profiles (edge-pipeline targets).",
            ""]
    return "\n".join(head) + yaml.safe_dump(doc, sort_keys=False)


def write_starter(path: Path, model: str, data: str, targets: list[str] | None, force: bool,
                  weights: str | None = None) -> Path:
    import os

    if path.exists() and not force:
        raise PipelineError(f"{path} exists", where="--out", hint="choose another --out, or pass --force")
    if weights:
        if not Path(weights).is_file():
            raise PipelineError(f"weights file not found: {weights}", where="--weights")
        weights = os.path.relpath(Path(weights).absolute(), path.absolute().parent)  # recipe paths: from its folder
    text = starter_recipe(model, data, targets, None, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
