"""EfficientNet-Lite0 int8 on LiteRT with and without the layout and annotation fixes (zero pads kept in NHWC,
adds between quantized tensors annotated): the file's operator counts, 1-thread p50 (median of 3 fresh pinned
runner processes, 30 timed runs each) and top-1 on the labelled photos of recipes/efficientnet-lite0-imagenet.yaml
(EDGE_PIPELINE_IMAGENET, its test split). LiteRT's Python interpreter has no operator profiler: the operator
counts say where the overhead was.

    .venv/bin/python scripts/litert_layout.py > litert_layout.json
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from labelled_lite0 import setup

from edge_pipeline.backends import pt2e, tflite
from edge_pipeline.evaluation import example_inputs, run_artifact
from edge_pipeline.interface import FlatModel
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile


def op_counts(path: Path) -> dict[str, int]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return dict(Counter(o["op_name"] for o in it._get_ops_details()).most_common())


def main() -> int:
    lite0 = setup()
    data, model, iface, ev = lite0.data, lite0.model, lite0.iface, lite0.evaluator
    calibration, tmp, row, device = lite0.calibration, lite0.tmp, lite0.row, lite0.device
    fixes = (tflite.pads_in_nhwc, pt2e.annotate_between_quantized)
    out = {}
    for variant, target, fixed in (("int8 before (pads in NCHW, chained adds unannotated)", "tflite-int8", False),
                                   ("int8 as shipped", "tflite-int8", True), ("fp32", "tflite-fp32", True)):
        # "before" runs the litert-torch pass without the pad rule: this must be the process's first build
        tflite.pads_in_nhwc, pt2e.annotate_between_quantized = fixes if fixed else (lambda: None, lambda gm, s: 0)
        folder = tmp / variant.split(" (")[0].replace(" ", "-")
        folder.mkdir()
        path = tflite.export(FlatModel(model), example_inputs(data), calibration, load_profile(target), folder,
                             iface, fixtures=False)
        p50s = [measure_on_device(device, path, row, 1, 30, 5, pin=True)[0]["latency"]["p50_ms"] for _ in range(3)]
        out[variant] = {"p50_ms": float(np.median(p50s)), "ops": op_counts(path),
                        "test_top1": ev.score_outputs(run_artifact(path, data.test), "test")}
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
