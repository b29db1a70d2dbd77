"""EfficientNet-Lite0 int8 on ExecuTorch with and without zero pads left to their convolutions: per-operator
profile (ETDump), 1-thread p50 (median of 3 fresh pinned runner processes, 30 timed runs each) and top-1 on the
labelled photos of recipes/efficientnet-lite0-imagenet.yaml (EDGE_PIPELINE_IMAGENET, its test split).

    .venv/bin/python scripts/pad_profile.py > pad_profile.json
"""

import json
import sys

import numpy as np
from labelled_lite0 import setup

from edge_pipeline.backends import executorch, pt2e
from edge_pipeline.evaluation import example_inputs, run_artifact
from edge_pipeline.interface import FlatModel
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile


def main() -> int:
    lite0 = setup()
    data, model, iface, ev = lite0.data, lite0.model, lite0.iface, lite0.evaluator
    calibration, tmp, row, device = lite0.calibration, lite0.tmp, lite0.row, lite0.device
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
