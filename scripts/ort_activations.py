"""EfficientNet-Lite0 int8 for ONNX Runtime on x86 (amd64 file, 7-bit weights) with int8 and with uint8
activations, beside fp32: top-1 and agreement with fp32 on the labelled photos of
recipes/efficientnet-lite0-imagenet.yaml (EDGE_PIPELINE_IMAGENET, its test split) and the 1-thread p50 (median
of 3 pinned runner processes of 40 timed runs, the builds interleaved), and how many convs and adds ORT's graph
optimizer left in float.

    .venv/bin/python scripts/ort_activations.py > ort_activations.json
"""

import json
import sys
from pathlib import Path

import numpy as np
from labelled_lite0 import setup

from edge_pipeline.backends import onnxruntime as ob
from edge_pipeline.evaluation import example_inputs, run_artifact
from edge_pipeline.interface import FlatModel
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile


def float_ops(onnx_path: Path, folder: Path) -> dict[str, int]:
    """Conv and Add nodes ORT's optimizer left in float (not fused into QLinearConv / QLinearAdd)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node]
    return {k: kinds.count(k) for k in ("Conv", "Add", "QLinearConv", "QLinearAdd", "Transpose")}


def main() -> int:
    from onnxruntime.quantization import QuantType

    lite0 = setup()
    data, model, iface, ev = lite0.data, lite0.model, lite0.iface, lite0.evaluator
    calibration, tmp, row, device = lite0.calibration, lite0.tmp, lite0.row, lite0.device
    shipped = ob.activation_type
    paths, out = {}, {}
    for variant, target, act in (("int8 activations", "ort-x86-int8", QuantType.QInt8),
                                 ("uint8 activations (as shipped)", "ort-x86-int8", None),
                                 ("fp32", "ort-x86-fp32", None)):
        ob.activation_type = shipped if act is None else (lambda profile, _a=act: _a)
        folder = tmp / f"build-{len(paths)}"
        folder.mkdir()
        paths[variant] = ob.export(FlatModel(model), example_inputs(data), calibration, load_profile(target),
                                   folder, iface, fixtures=False)
        out[variant] = {"float_or_fused_ops": float_ops(folder / "model.onnx", folder), "p50s_ms": []}
    outputs = {v: run_artifact(p, data.test) for v, p in paths.items()}
    for v in paths:
        out[v]["test_top1"] = ev.score_outputs(outputs[v], "test")
        out[v]["agreement_with_fp32"] = float((outputs[v][0].argmax(1) == outputs["fp32"][0].argmax(1)).mean())
    for _ in range(3):
        for v, p in paths.items():
            out[v]["p50s_ms"].append(measure_on_device(device, p, row, 1, 40, 5, pin=True)[0]["latency"]["p50_ms"])
    for v in out:
        out[v]["p50_ms"] = float(np.median(out[v]["p50s_ms"]))
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
