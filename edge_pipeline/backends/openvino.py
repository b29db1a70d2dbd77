"""OpenVINO: torch.export -> ov.convert_model -> NNCF post-training int8 -> IR (.xml + weights .bin).

OpenVINO runs on the x86 CPUs of edge boxes and IoT gateways (and on arm64). NNCF is the quantizer made for it:
FakeQuantize ops with per-channel int8 weights that the CPU plugin runs as int8 kernels. Layers the accuracy
fallback would keep in float cannot be found by name after conversion (see BACKEND.notes).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import Backend
from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import ModelInterface
from edge_pipeline.targets import Profile

SUFFIX = ".xml"
STRUCTURAL_OPS = ("Constant", "Parameter", "Result")
AUTO_NAME = re.compile(r"[A-Za-z0-9]+_\d+")


def _convert(model: nn.Module, example: tuple[torch.Tensor, ...], iface: ModelInterface):
    """The float model as an ov.Model with the example's static shapes and the interface's tensor names. From
    torch.export's program, as the other backends: OpenVINO's TorchScript tracing fails on nn.MultiheadAttention."""
    import openvino as ov

    om = ov.convert_model(torch.export.export(model.eval(), example))
    om.reshape({port: ov.PartialShape(list(t.shape)) for port, t in zip(om.inputs, example, strict=True)})
    for port, name in zip(om.inputs, iface.input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(om.outputs, iface.output_names, strict=True):
        port.get_tensor().set_names({name})
    return om


def _quantize(om, calibration: tuple[np.ndarray, ...], profile: Profile):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.ERROR)  # its progress bars and notes go nowhere useful in a stage log
    q = profile.quantization
    rows = [tuple(a[i:i + 1] for a in calibration) for i in range(len(calibration[0]))]
    return nncf.quantize(
        om, nncf.Dataset(rows), subset_size=len(rows),
        preset=nncf.QuantizationPreset.PERFORMANCE if q.symmetric_activations else nncf.QuantizationPreset.MIXED,
        advanced_parameters=AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(per_channel=q.per_channel),
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def _stable_names(om) -> None:
    """Name the ops OpenVINO named from its process-wide counter (``Multiply_47678``) by their place in the
    graph instead: the counter depends on what ran before in the process, and the IR would differ byte for byte
    between two builds of the same model. Run after conversion and again after NNCF (its own constants)."""
    om.set_friendly_name("model")  # "Model<counter>" otherwise
    for i, op in enumerate(om.get_ordered_ops()):
        if AUTO_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}.{i}")


def export(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
           profile: Profile, out_dir: Path, iface: ModelInterface, float_layers=(), default_flow: bool = False,
           fixtures: bool = True, qat: dict | None = None) -> Path:
    """``default_flow``: NNCF's own defaults (mixed preset, its range estimators)."""
    import nncf
    import openvino as ov

    for asked, capability in ((qat is not None, "qat"), (bool(float_layers), "float_layers")):
        if asked:
            raise PipelineError(BACKEND.refusal(capability), where=f"target profile {profile.name}")
    om = _convert(model, example, iface)
    _stable_names(om)  # before NNCF, which names its quantizers after the ops they quantize
    if profile.precision == "int8":
        if default_flow:
            nncf.set_log_level(logging.ERROR)
            rows = [tuple(a[i:i + 1] for a in calibration) for i in range(len(calibration[0]))]
            om = nncf.quantize(om, nncf.Dataset(rows), subset_size=len(rows))
        else:
            om = _quantize(om, calibration, profile)
    path = out_dir / f"model{SUFFIX}"
    _stable_names(om)
    ov.save_model(om, str(path), compress_to_fp16=False)
    ops = Counter(op.get_type_name() for op in om.get_ops() if op.get_type_name() not in STRUCTURAL_OPS)
    info = {"backend": "openvino", "format": "OpenVINO IR (model.xml + model.bin)", "ops": dict(sorted(ops.items())),
            "coverage": f"{ops.get('FakeQuantize', 0)} FakeQuantize op(s) (int8 where the CPU plugin fuses them)"
            if profile.precision == "int8" else "float32", "float_layers": list(float_layers),
            "inputs": [{"name": n, "shape": list(p.get_shape()), "dtype": p.get_element_type().to_dtype().name}
                       for n, p in zip(iface.input_names, om.inputs, strict=True)],
            "outputs": [{"name": n, "shape": list(p.get_partial_shape().to_shape()),
                         "dtype": p.get_element_type().to_dtype().name}
                        for n, p in zip(iface.output_names, om.outputs, strict=True)],
            "quantized_io": None}
    (out_dir / "describe.json").write_text(json.dumps(info, indent=1))
    return path


def write_fixtures(path: Path, example: tuple[torch.Tensor, ...], iface: ModelInterface) -> None:
    """Nothing beyond the artifact: OpenVINO has no phone benchmark tool here (the runner measures it)."""


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())


BACKEND = Backend(
    "openvino", "OpenVINO IR for its CPU plugin (.xml + .bin), int8 by NNCF", SUFFIX,
    packages=("torch", "openvino", "nncf"), targets=("openvino-cpu-int8", "openvino-cpu-fp32"),
    calibration_methods=("minmax",), float_layers=False,
    notes={"float_layers": "OpenVINO's conversion fuses BatchNorm into each convolution and renames it, so a "
                           "PyTorch layer name finds no op to keep in float",
           "weights": "not read back from the IR here",
           "qat": "NNCF's QAT trains its own graph, not this pipeline's PT2E fake quantizers",
           "layer_errors": "no per-layer int8 error from OpenVINO here (the fallback ranks layers by output "
                           "sensitivity alone)"})
