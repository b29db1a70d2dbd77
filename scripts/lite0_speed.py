"""EfficientNet-Lite0 int8 against fp32 on every runtime, on this host: p50 at 1 thread and at all cores
(median of 3 rounds of pinned runner processes, 40 timed runs each, the builds interleaved), the per-operator
profile's top kinds and overhead share where the runtime has a profiler, and top-1 / agreement with fp32 on the
labelled photos of recipes/efficientnet-lite0-imagenet.yaml (EDGE_PIPELINE_IMAGENET, its test split). The int8
builds are the plain all-int8 ones (no float fallback), per-channel weights, 96 calibration photos.

    .venv/bin/python scripts/lite0_speed.py > lite0_speed.json
"""

import json
import os
import sys

import numpy as np
from labelled_lite0 import setup

from edge_pipeline.backends import get_backend
from edge_pipeline.bench import int8_features, machine
from edge_pipeline.evaluation import example_inputs, output_agreement, run_artifact
from edge_pipeline.interface import FlatModel
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile

PAIRS = {"ExecuTorch": ("executorch-xnnpack-int8", "executorch-xnnpack-fp32"),
         "ONNX Runtime (amd64-vnni file)": ("ort-x86-vnni-int8", "ort-x86-fp32"),
         "ONNX Runtime (amd64 file)": ("ort-x86-int8", "ort-x86-fp32"),
         "LiteRT": ("tflite-int8", "tflite-fp32")}


def main() -> int:
    lite0 = setup()
    data, model, ev = lite0.data, lite0.model, lite0.evaluator
    paths = {}
    for target in dict.fromkeys(t for pair in PAIRS.values() for t in pair):
        profile = load_profile(target)
        folder = lite0.tmp / target
        folder.mkdir()
        paths[target] = get_backend(profile.backend).export(FlatModel(model), example_inputs(data),
                                                            lite0.calibration, profile, folder, lite0.iface,
                                                            fixtures=False)
    out = {"machine": machine(), "int8_features": int8_features(), "targets": {}}
    for target, path in paths.items():
        outputs = run_artifact(path, data.test)
        out["targets"][target] = {"test_top1": ev.score_outputs(outputs, "test"), "outputs": outputs[0]}
    cores = os.cpu_count() or 1
    for threads in sorted({1, cores}):
        p50s = {t: [] for t in paths}
        for _ in range(3):
            for target, path in paths.items():
                m, _ = measure_on_device(lite0.device, path, lite0.row, threads, 40, 5, pin=threads == 1,
                                         profile=threads == 1)
                p50s[target].append(m["latency"]["p50_ms"])
                if threads == 1 and m.get("profile", {}).get("summary"):
                    s = m["profile"]["summary"]
                    out["targets"][target]["profile"] = {"op_ms": s["total_ms"], "top_kinds": s["top_kinds"][:5],
                                                         "overhead_share": s["overhead_share"],
                                                         "overhead": s["overhead"]}
        for target in paths:
            out["targets"][target][f"p50_ms_{threads}t"] = float(np.median(p50s[target]))
            out["targets"][target][f"p50s_ms_{threads}t"] = p50s[target]
    rows = {}
    for runtime, (int8, fp32) in PAIRS.items():
        a, f = out["targets"][int8], out["targets"][fp32]
        agree = output_agreement(a["outputs"], f["outputs"])
        rows[runtime] = {"int8_top1": a["test_top1"], "fp32_top1": f["test_top1"],
                         "agreement": agree.get("top1_agreement"), "cosine": agree["cosine"],
                         **{f"ratio_{t}t": a[f"p50_ms_{t}t"] / f[f"p50_ms_{t}t"] for t in sorted({1, cores})}}
    for t in out["targets"].values():
        t.pop("outputs")
    out["ratios"] = rows
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
