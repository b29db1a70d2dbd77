"""EfficientNet-Lite0's ONNX Runtime file from a QAT state (the QAT graph exported to QDQ ONNX) against its
post-training file (``quantize_static``), for the x86 (amd64) and arm profiles: the convs and adds ORT's graph
optimizer fused or left in float, and the 1-thread p50 (median of 3 pinned runner processes of 40 timed runs, the
builds interleaved). The QAT state is the prepared QAT graph after one pass over the calibration rows (its fake
quantizers' ranges, no training): the graph's form, which is what sets the speed, is a trained one's.

    .venv/bin/python scripts/ort_qat_speed.py > ort_qat_speed.json
"""

import json
import sys

import numpy as np
import torch
from labelled_lite0 import setup
from ort_activations import float_ops

from edge_pipeline.backends import onnxruntime as ob
from edge_pipeline.backends import pt2e
from edge_pipeline.evaluation import example_inputs
from edge_pipeline.interface import FlatModel
from edge_pipeline.stages.device_test import measure_on_device
from edge_pipeline.targets import load_profile


def qat_state(model, calibration, profile) -> dict:
    from torchao.quantization.pt2e import move_exported_model_to_eval

    prepared, batch = pt2e.prepare_qat(model, calibration, ob.qat_quantizer(profile))
    move_exported_model_to_eval(prepared)  # the published BatchNorm statistics stay
    with torch.no_grad():
        for i in range(0, len(calibration[0]), batch):
            prepared(*[torch.from_numpy(a[i:i + batch]) for a in calibration])
    return prepared.state_dict()


def main() -> int:
    lite0 = setup()
    model, data, iface, calibration = FlatModel(lite0.model), lite0.data, lite0.iface, lite0.calibration
    paths, out = {}, {}
    for target in ("ort-x86-int8", "ort-mobile-int8"):
        profile = load_profile(target)
        state = qat_state(model, calibration, profile)
        for kind, qat in (("post-training", None), ("qat", state)):
            folder = lite0.tmp / f"{target}-{kind}"
            folder.mkdir()
            name = f"{target} {kind}"
            paths[name] = ob.export(model, example_inputs(data), calibration, profile, folder, iface,
                                    fixtures=False, qat=qat)
            out[name] = {"float_or_fused_ops": float_ops(folder / "model.onnx", folder), "p50s_ms": []}
    for _ in range(3):
        for name, path in paths.items():
            out[name]["p50s_ms"].append(
                measure_on_device(lite0.device, path, lite0.row, 1, 40, 5, pin=True)[0]["latency"]["p50_ms"])
    for name in out:
        out[name]["p50_ms"] = float(np.median(out[name]["p50s_ms"]))
    for target in ("ort-x86-int8", "ort-mobile-int8"):
        out[f"{target} qat / post-training p50"] = out[f"{target} qat"]["p50_ms"] / out[f"{target} post-training"][
            "p50_ms"]
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
