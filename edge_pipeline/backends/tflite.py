"""TFLite/LiteRT: litert-torch conversion, int8 through its PT2E quantizer; no TensorFlow needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import pt2e
from edge_pipeline.errors import PipelineError
from edge_pipeline.targets import Profile

SUFFIX = ".tflite"
RUNTIME = "ai_edge_litert"
# Checked with litert-torch 0.10.0: layers left out of the PT2E annotation still came out int8-broken (an
# MLP with both layers kept float scored as the all-int8 model), so no per-layer float fallback here.
MIXED_PRECISION = False


def export(model: nn.Module, example: torch.Tensor, calibration: np.ndarray, profile: Profile, out_dir: Path,
           float_layers=(), default_flow: bool = False) -> Path:
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    model = model.eval()
    path = out_dir / f"model{SUFFIX}"
    if profile.precision == "int8":
        if profile.io == "float":
            raise PipelineError("litert-torch's PT2E int8 conversion gives int8 inputs and outputs",
                                where=f"target profile {profile.name}: io",
                                hint="use io: int8 (the runner and describe give the scale and zero point)")
        if default_flow:  # the quantizer's own defaults
            q = PT2EQuantizer().set_global(get_symmetric_quantization_config())
        else:
            base = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel,
                                                     is_dynamic=False)
            q = PT2EQuantizer().set_global(pt2e.configure(base, profile))
        pt2e.keep_float(q, float_layers)
        gm = pt2e.quantize(model, example, calibration, q, fold_quantize=False)
        edge = litert_torch.convert(gm, (example,), quant_config=QuantConfig(pt2e_quantizer=q))
    else:
        edge = litert_torch.convert(model, (example,))
    edge.export(str(path))
    info = _describe(path, float_layers)
    (out_dir / "describe.json").write_text(json.dumps(info, indent=1))
    _write_raw_input(path, example, info, out_dir)
    return path


def _write_raw_input(path: Path, example: torch.Tensor, info: dict, out_dir: Path) -> None:
    """A raw input file for benchmark_model --input_layer_value_files, in the model's own input dtype."""
    x = example.numpy()
    q = info["inputs"][0].get("quantization")
    if q:
        x = np.clip(np.round(x / q["scale"] + q["zero_point"]), -128, 127).astype(np.int8)
    (out_dir / "input_0.raw").write_bytes(np.ascontiguousarray(x).tobytes())


def _describe(path: Path, float_layers) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()

    def io(details):
        out = []
        for d in details:
            scale, zp = d["quantization"]
            out.append({"name": d["name"], "shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name,
                        "quantization": {"scale": float(scale), "zero_point": int(zp)} if scale else None})
        return out

    ops: dict[str, int] = {}
    for op in it._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    inputs, outputs = io(it.get_input_details()), io(it.get_output_details())
    return {"backend": "tflite", "ops": ops, "inputs": inputs, "outputs": outputs, "float_layers": list(float_layers),
            "quantized_io": {"input": inputs[0]["quantization"], "output": outputs[0]["quantization"]}}


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())
