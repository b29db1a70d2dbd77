"""EfficientNet-Lite0 int8 on ExecuTorch with and without zero pads left to their convolutions: per-operator
profile (ETDump), 1-thread p50 (median of 3 fresh pinned runner processes, 30 timed runs each) and top-1 on the
labelled photos of recipes/efficientnet-lite0-imagenet.yaml (EDGE_PIPELINE_IMAGENET, its test split).

    .venv/bin/python scripts/pad_profile.py > pad_profile.json
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_pipeline.backends import executorch, pt2e
from edge_pipeline.devices import LocalDevice, parse_device
from edge_pipeline.evaluation import Evaluator, example_inputs, resolve_metric, run_artifact
from edge_pipeline.interface import FlatModel, discover
from edge_pipeline.recipe import load_recipe
from edge_pipeline.sources import build_model, load_data
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "efficientnet-lite0-imagenet.yaml"


def main() -> int:
    r = load_recipe(str(RECIPE))
    data = load_data(r.data, preprocess=r.preprocess.model_dump(), labels=r.labels.model_dump(),
                     fractions=r.split.fractions())
    model = build_model(r.model, data.num_classes, data.input_shape[0]).eval()
    iface = discover(model, data.example)
    ev = Evaluator(data, iface, resolve_metric("top1", iface.output_names, True, None), model)
    calibration = tuple(data.train.rows(np.arange(min(r.calibrate.samples, len(data.train)))))
    tmp = Path(tempfile.mkdtemp())
    row = tmp / "row.npz"
    from edge_pipeline.harness import runner

    runner.save_inputs(row, data.test.rows(np.arange(1)))
    device = LocalDevice(parse_device("local"), 600)
    out = {}
    folding = pt2e.FusedActivations.__init__
    for variant, target, fold in (("pads in the int8 annotation", "executorch-xnnpack-int8", False),
                                  ("pads left to their convolutions", "executorch-xnnpack-int8", True),
                                  ("fp32", "executorch-xnnpack-fp32", True)):
        def init(self, inner, output_layers=None, keep_outputs=True, pads_into_convs=False, _fold=fold):
            folding(self, inner, output_layers, keep_outputs, pads_into_convs and _fold)

        pt2e.FusedActivations.__init__ = init
        folder = tmp / variant.replace(" ", "-")
        folder.mkdir()
        path = executorch.export(FlatModel(model), example_inputs(data), calibration, load_profile(target), folder,
                                 iface, fixtures=False)
        p50s, profile = [], None
        for _ in range(3):
            m, _outputs = measure_on_device(device, path, row, 1, 30, 5, pin=True, profile=profile is None)
            p50s.append(m["latency"]["p50_ms"])
            profile = profile or m["profile"]
        s = profile["summary"]
        out[variant] = {"p50_ms": float(np.median(p50s)), "test_top1": ev.score_outputs(run_artifact(path, data.test),
                                                                                          "test"),
                        "overhead_share": s["overhead_share"], "overhead": s["overhead"], "op_ms": s["total_ms"],
                        "top_kinds": s["top_kinds"][:6]}
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
