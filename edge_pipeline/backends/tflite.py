"""TFLite/LiteRT: litert-torch conversion, int8 through its PT2E quantizer; no TensorFlow needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import pt2e
from edge_pipeline.devices.runner import load_runner
from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import ModelInterface
from edge_pipeline.targets import Profile

SUFFIX = ".tflite"
RUNTIME = "ai_edge_litert"
# Checked with litert-torch 0.10.0: layers left out of the PT2E annotation still came out int8-broken (an
# MLP with both layers kept float scored as the all-int8 model), so no per-layer float fallback here.
MIXED_PRECISION = False


def export(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
           profile: Profile, out_dir: Path, iface: ModelInterface, float_layers=(), default_flow: bool = False,
           fixtures: bool = True, qat: dict | None = None) -> Path:
    """``qat``: a QAT run's trained state; the int8 model is then the one it learned, not a calibrated one."""
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
        if qat is not None:
            q = qat_quantizer(profile)
            gm = pt2e.convert_qat(model, calibration, q, qat, fold_quantize=False)
            static = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_dynamic=False))
            edge = litert_torch.convert(gm, example, quant_config=QuantConfig(pt2e_quantizer=static))
            edge.export(str(path))
            return _finish(path, out_dir, example, iface, float_layers, fixtures)
        if default_flow:  # the quantizer's own defaults
            q = PT2EQuantizer().set_global(get_symmetric_quantization_config())
        else:
            base = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel,
                                                     is_dynamic=False)
            q = PT2EQuantizer().set_global(pt2e.configure(base, profile))
        pt2e.keep_float(q, float_layers)
        # keep_outputs=False: litert-torch gives int8 outputs whatever the annotation (a float or dynamic head
        # made no difference to the converted file): the outputs stay static int8, over the range fitted to the
        # rows (pt2e.fit_output_ranges).
        quantizer = q if default_flow else pt2e.FusedActivations(q, keep_outputs=False)
        gm = pt2e.quantize(model, calibration, quantizer, fold_quantize=False)
        edge = litert_torch.convert(gm, example, quant_config=QuantConfig(pt2e_quantizer=q))
    else:
        edge = litert_torch.convert(model, example)
    edge.export(str(path))
    return _finish(path, out_dir, example, iface, float_layers, fixtures)


def _finish(path: Path, out_dir: Path, example, iface: ModelInterface, float_layers, fixtures: bool) -> Path:
    (out_dir / "describe.json").write_text(json.dumps(_describe(path, iface, float_layers), indent=1))
    if fixtures:
        write_fixtures(path, example, iface)
    return path


def qat_quantizer(profile: Profile):
    """XNNPACK's QAT config, whose int8 scheme litert-torch's PT2E quantizer copies (asymmetric int8 activations,
    symmetric int8 weights): litert-torch 0.10.0's own ``is_qat=True`` quantizer fails on every conv+BatchNorm
    model beside torchao here (its pattern annotator hands torch.export a function, which it refuses). The
    converted model's quantize/dequantize pairs are what litert-torch lowers, whichever quantizer placed them."""
    from edge_pipeline.backends import executorch

    if profile.io == "float":
        raise PipelineError("litert-torch's PT2E int8 conversion gives int8 inputs and outputs",
                            where=f"target profile {profile.name}: io", hint="use io: int8")
    return executorch.qat_quantizer(profile)


def write_fixtures(path: Path, example: tuple[torch.Tensor, ...], iface: ModelInterface) -> None:
    """input_<i>.raw for benchmark_model --input_layer_value_files, each in the model's own input dtype (and
    int8 scale where its inputs are quantized). Written only for the artifact lower ships."""
    out_dir = Path(path).parent
    for i, (t, spec) in enumerate(zip(example, describe(path)["inputs"], strict=True)):
        x, q = t.numpy(), spec.get("quantization")
        if q:
            x = np.clip(np.round(x / q["scale"] + q["zero_point"]), -128, 127)
        (out_dir / f"input_{i}.raw").write_bytes(np.ascontiguousarray(x, dtype=spec["dtype"]).tobytes())


def _describe(path: Path, iface: ModelInterface, float_layers) -> dict:
    """I/O in the model's order under the interface's names, with the file's own tensor names, dtypes and
    int8 scale/zero point per tensor."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()

    def io(details, specs):
        out = []
        for d, spec in zip(details, specs, strict=True):
            scale, zp = d["quantization"]
            out.append({"name": spec.name, "tensor": d["name"], "shape": d["shape"].tolist(),
                        "dtype": np.dtype(d["dtype"]).name,
                        "quantization": {"scale": float(scale), "zero_point": int(zp)} if scale else None})
        return out

    ops: dict[str, int] = {}
    for op in it._get_ops_details():
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    ins, outs = load_runner().tflite_io(it)
    inputs, outputs = io(ins, iface.inputs), io(outs, iface.outputs)
    return {"backend": "tflite", "ops": ops, "inputs": inputs, "outputs": outputs, "float_layers": list(float_layers),
            "quantized_io": {"inputs": {d["name"]: d["quantization"] for d in inputs},
                             "outputs": {d["name"]: d["quantization"] for d in outputs}}}


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())
