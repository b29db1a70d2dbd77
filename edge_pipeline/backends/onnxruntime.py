"""ONNX Runtime mobile: torch.onnx.export(dynamo=True) -> quant_pre_process -> quantize_static (QDQ) -> .ort"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import Backend, DeviceTool, activations_entry
from edge_pipeline.devices.tool_output import NUM, latency
from edge_pipeline.errors import PipelineError
from edge_pipeline.interface import ModelInterface, flat_name
from edge_pipeline.rounding import QMAX
from edge_pipeline.targets import Profile, converter_platform

SUFFIX = ".ort"
ORT_METHODS = {"minmax": "MinMax", "moving_average": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def _reader(calibration: tuple[np.ndarray, ...], names: list[str]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{n: a[i:i + 1] for n, a in zip(names, calibration, strict=True)}
                             for i in range(len(calibration[0]))])

        def get_next(self):
            return next(self._it, None)

    return Reader()


def _float_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, iface: ModelInterface) -> None:
    _save_onnx(model.eval(), example, path, iface)


def _save_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, iface: ModelInterface) -> None:
    """torch.onnx.export (dynamo) of a module as it is (an exported graph module refuses ``.eval()``)."""
    prog = torch.onnx.export(module, example, dynamo=True, input_names=iface.input_names,
                             output_names=iface.output_names, verbose=False)
    prog.save(str(path), external_data=False)


def _pre_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], iface: ModelInterface, build: Path) -> Path:
    """float.onnx -> pre.onnx in ``build`` (``quant_pre_process``: shapes inferred, BatchNorm folded): what both
    quantizers read."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _float_onnx(model, example, build / "float.onnx", iface)
    quant_pre_process(str(build / "float.onnx"), str(build / "pre.onnx"))
    return build / "pre.onnx"


def _quantize(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
              profile: Profile, iface: ModelInterface, build: Path, float_layers=(),
              default_flow: bool = False) -> tuple[Path, int]:
    """float.onnx -> pre.onnx (quant_pre_process: shapes, BatchNorm folded) -> qdq.onnx in ``build``; with how
    many depthwise convs kept 8-bit weights in a 7-bit (``reduces_range``) file."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = _pre_onnx(model, example, iface, build)
    q = profile.quantization
    eight_bit_depthwise = []
    if default_flow:  # quantize_static's own defaults (QDQ, per-tensor, MinMax, QUInt8 activations)
        kwargs = {}
    else:
        if q.method not in ORT_METHODS:
            raise PipelineError(f"calibration method '{q.method}' is not available for backend 'onnxruntime'",
                                where="target profile: quantization.method",
                                hint=f"onnxruntime supports: {', '.join(ORT_METHODS)}")
        extra = {"ActivationSymmetric": q.symmetric_activations, "WeightSymmetric": True}
        if q.method == "moving_average":
            extra["CalibMovingAverage"] = True
        if q.method == "percentile":
            extra["CalibPercentile"] = q.percentile
        pre_model = onnx.load(str(pre))
        per_tensor = {flat_name(layer) for layer in q.per_tensor_layers}
        overrides = {  # an override without "axis" is one scale for the tensor
            t.name: [{"symmetric": True}] for t in pre_model.graph.initializer
            if t.name.endswith(".weight") and t.name.rpartition(".")[0] in per_tensor}
        if reduces_range(profile):  # ORT's depthwise kernel adds in int32 on every x86 CPU: 8-bit weights
            eight_bit_depthwise = depthwise_weights(pre_model)
            for name in eight_bit_depthwise:
                base = overrides.get(name, [{"axis": 0} if q.per_channel else {}])[0]
                overrides[name] = [{**base, "reduce_range": False}]
        extra["TensorQuantOverrides"] = overrides
        kept = set(nodes_kept_float(build / "float.onnx", pre, float_layers))
        heads = set(output_layer_nodes(pre_model)) - kept
        kwargs = dict(per_channel=q.per_channel, activation_type=activation_type(profile), weight_type=QuantType.QInt8,
                      reduce_range=reduces_range(profile), extra_options=extra,
                      calibrate_method=getattr(CalibrationMethod, ORT_METHODS[q.method]),
                      nodes_to_exclude=sorted(kept | heads))
    quantize_static(str(build / "pre.onnx"), str(build / "qdq.onnx"), _reader(calibration, iface.input_names),
                    quant_format=QuantFormat.QDQ, **kwargs)
    if not default_flow:
        int8_weights_only(build / "qdq.onnx", heads)
    return build / "qdq.onnx", len(eight_bit_depthwise)


def qat_quantizer(profile: Profile):
    """ONNX Runtime has no PT2E quantizer of its own: QAT trains with XNNPACK's QAT config (int8 activations,
    symmetric int8 weights per channel or per tensor, as ``quantize_static`` makes them here), weights 7-bit for
    x86 files (``reduces_range``), and the converted model is exported to QDQ ONNX as it is."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from edge_pipeline.backends import pt2e

    bound = 63 if reduces_range(profile) else 127
    config = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel, is_qat=True,
                                               weight_qmin=-bound, weight_qmax=bound)
    return pt2e.FusedActivations(XNNPACKQuantizer().set_global(config), keep_outputs=False)


def _qat_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
              profile: Profile, iface: ModelInterface, build: Path, qat: dict) -> tuple[Path, dict[str, int]]:
    """The QAT run's converted model, exported as it is: its quantize/dequantize ops become ONNX's
    QuantizeLinear/DequantizeLinear with the learned scales, which ORT fuses into int8 kernels like a
    ``quantize_static`` QDQ model. (The other way, the learned ranges fed to ``quantize_static`` through
    TensorQuantOverrides, needs every PT2E tensor matched to an ONNX tensor name, and the exported weights
    would still be the float ones, not the weights QAT learned to round.)"""
    from edge_pipeline.backends import pt2e

    gm = pt2e.convert_qat(model, calibration, qat_quantizer(profile), qat)
    _save_onnx(gm, example, build / "qdq.onnx", iface)
    rewrites = {f"{k}s_folded": v for k, v in fold_clips_and_pads(build / "qdq.onnx").items()}
    if activation_type(profile).name == "QUInt8":
        rewrites["quantize_ops_to_uint8"] = activations_to_uint8(build / "qdq.onnx")
    return build / "qdq.onnx", rewrites


def _constants(graph) -> dict[str, np.ndarray]:
    """Every initializer and Constant node's value of an ONNX graph, by tensor name."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return consts | {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                     if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}


def _drop_value_info(graph, names: set[str]) -> None:
    """Removes the recorded type/shape of these tensors (a rewrite changed them; ORT infers them again)."""
    for info in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(info)


def activations_to_uint8(path: Path) -> int:
    """PT2E's int8 activations rewritten as the uint8 ones ORT's x86 kernels take (``activation_type``): every
    QuantizeLinear, and every DequantizeLinear that does not read a weight, gets zero point + 128 as uint8. Exact:
    q_u8 = q_s8 + 128 over the whole range, and (q_u8 - (zp + 128)) * s = (q_s8 - zp) * s. Weights stay int8.
    Returns how many quantize/dequantize ops changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    consts = _constants(graph)
    shifted: dict[str, str] = {}  # int8 zero point -> its uint8 copy (an int8 one may be a weight's too)
    changed, retyped = 0, set()
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            continue
        zp = consts.get(n.input[2])
        if zp is None or zp.dtype != np.int8 or (n.op_type == "DequantizeLinear" and n.input[0] in weights):
            continue
        if n.input[2] not in shifted:
            name = f"{n.input[2]}_uint8"
            graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
            shifted[n.input[2]] = name
        n.input[2] = shifted[n.input[2]]
        retyped |= {n.output[0]} if n.op_type == "QuantizeLinear" else set()
        changed += 1
    _drop_value_info(graph, retyped)  # the exporter's int8 types, now stale
    onnx.save(model, str(path))
    return changed


def fold_clips_and_pads(path: Path) -> dict[str, int]:
    """What ``quantize_static`` (after ``quant_pre_process``) leaves out of a QDQ graph, taken out of an exported
    one: a Clip whose every reader is a QuantizeLinear whose range lies inside the Clip's (the quantizer saturates
    there anyway), and a zero Pad over height and width before a QuantizeLinear -> DequantizeLinear -> Conv, moved
    into the Conv's own ``pads``. Left in, both ran in float between dequantize and quantize ops: the QAT
    EfficientNet-Lite0 file ran 1.8x slower than the post-training one. Returns how many of each were folded."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    consts = _constants(graph)
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def value(name, default=None):
        return consts.get(name, default) if name else default

    def q_range(q):
        scale, zp = value(q.input[1]), value(q.input[2] if len(q.input) > 2 else "", np.zeros((), np.uint8))
        if scale is None or zp is None or scale.size != 1:
            return None
        info = np.iinfo(zp.dtype)
        return float(scale) * (info.min - int(zp)), float(scale) * (info.max - int(zp)), float(scale)

    def rename_input(old: str, new: str) -> None:
        for r in readers.get(old, []):
            r.input[:] = [new if i == old else i for i in r.input]

    outputs = {o.name for o in graph.output}  # a graph output keeps its name: its producer stays
    dropped, folded, unpadded = [], {"clip": 0, "pad": 0}, set()
    for n in graph.node:
        if n.output[0] in outputs:
            continue
        if n.op_type == "Clip" and len(n.input) >= 3:
            lo, hi = value(n.input[1]), value(n.input[2])
            users = readers.get(n.output[0], [])
            ranges = [q_range(u) if u.op_type == "QuantizeLinear" else None for u in users]
            if lo is None or hi is None or not users or None in ranges or any(
                    r[0] < float(lo) - 0.01 * r[2] or r[1] > float(hi) + 0.01 * r[2] for r in ranges):
                continue
            rename_input(n.output[0], n.input[0])
            dropped.append(n)
            folded["clip"] += 1
        elif n.op_type == "Pad" and len(n.input) in (2, 3):
            pads, fill = value(n.input[1]), value(n.input[2] if len(n.input) > 2 else "", np.zeros(()))
            mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
            q = readers.get(n.output[0], [])
            dq = readers.get(q[0].output[0], []) if len(q) == 1 and q[0].op_type == "QuantizeLinear" else []
            convs = readers.get(dq[0].output[0], []) if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" else []
            if pads is None or fill is None or mode != b"constant" or float(fill) != 0 or len(pads) != 8 \
                    or (pads < 0).any() or pads[[0, 1, 4, 5]].any() or not convs or any(
                        c.op_type != "Conv" or c.input[0] != dq[0].output[0]
                        or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in c.attribute)
                        for c in convs):
                continue
            for c in convs:
                attr = next((a for a in c.attribute if a.name == "pads"), None)
                old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
                new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
                if attr is not None:
                    c.attribute.remove(attr)
                c.attribute.append(onnx.helper.make_attribute("pads", new))
            q[0].input[0] = n.input[0]
            unpadded |= {q[0].output[0], dq[0].output[0]}
            dropped.append(n)
            folded["pad"] += 1
    for n in dropped:
        graph.node.remove(n)
    _drop_value_info(graph, unpadded)  # shapes of the padded tensor, now stale
    onnx.save(model, str(path))
    return folded


def _quantize_dynamic(model: nn.Module, example: tuple[torch.Tensor, ...], profile: Profile, iface: ModelInterface,
                      build: Path, float_layers=()) -> Path:
    """float.onnx -> pre.onnx -> dynamic.onnx (``quantize_dynamic``): int8 weights, each Conv/MatMul/Gemm quantizing
    its float input per inference (DynamicQuantizeLinear -> ConvInteger / MatMulInteger). Depthwise convs stay
    float: ORT's ConvInteger runs a group at a time; with them a briefly trained MobileNetV3's file ran 2.6x slower
    again, and with 8-bit weights lost 5 points of top-1."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _pre_onnx(model, example, iface, build)
    pre_model = onnx.load(str(pre))
    depthwise = set(depthwise_weights(pre_model))
    kept = {n.name for n in pre_model.graph.node if n.op_type == "Conv" and n.input[1] in depthwise}
    kept |= set(nodes_kept_float(build / "float.onnx", pre, float_layers))
    quantize_dynamic(str(pre), str(build / "dynamic.onnx"), per_channel=profile.quantization.per_channel,
                     weight_type=QuantType.QInt8, reduce_range=reduces_range(profile),
                     op_types_to_quantize=list(ONNX_LAYER_OPS), nodes_to_exclude=sorted(kept))
    if profile.quantization.per_channel:
        conv_weights_per_channel(build / "dynamic.onnx", pre_model, SEVEN_BIT_QMAX if reduces_range(profile) else QMAX)
    return build / "dynamic.onnx"


def symmetric_per_channel(a: np.ndarray, axis: int, qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """A weight quantized symmetrically per output channel (the slices along ``axis``): its int8 values and the
    scales, max |w| / qmax (zero point 0)."""
    moved = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    scale = np.maximum(np.abs(moved).max(1), 1e-12) / qmax
    shape = [1] * a.ndim
    shape[axis] = -1
    return np.clip(np.round(a / scale.reshape(shape)), -qmax, qmax).astype(np.int8), scale


def conv_weights_per_channel(path: Path, pre_model, qmax: int) -> int:
    """``quantize_dynamic`` gives each ConvInteger one weight scale per tensor: its ``per_channel`` reaches MatMul
    only. After BatchNorm folding a conv's output channels differ in scale many times over, and the small ones
    keep a few steps (a briefly trained MobileNetV3's per-inference ORT file: 27 dB on val against ExecuTorch's
    35 dB with per-channel weights). Each ConvInteger's weight is quantized again per output channel (symmetric:
    its zero point stays 0), and its scale becomes a [C, 1, ...] tensor, which the float Mul after the conv
    broadcasts over the channels. Returns how many convs changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    floats = {t.name: t for t in pre_model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for n in model.graph.node:
        base = n.input[1].removesuffix("_quantized") if n.op_type == "ConvInteger" else None
        zero = inits.get(n.input[3]) if base and len(n.input) > 3 else None
        if base not in floats or base + "_scale" not in inits or zero is None or numpy_helper.to_array(zero).any():
            continue
        w = numpy_helper.to_array(floats[base]).astype(np.float64)
        q, scale = symmetric_per_channel(w, 0, qmax)
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(q, n.input[1]))
        inits[base + "_scale"].CopyFrom(numpy_helper.from_array(
            scale.astype(np.float32).reshape(-1, *[1] * (w.ndim - 2)), base + "_scale"))
        changed += 1
    onnx.save(model, str(path))
    return changed


def activation_type(profile: Profile):
    """uint8 activations for x86 files, int8 for arm. ORT's x86 kernels multiply uint8 activations by int8 weights
    (VNNI's instruction takes exactly that); given int8 activations, its graph optimizer fused only some convs
    into QLinearConv and ran the rest in float between dequantize and quantize: EfficientNet-Lite0's amd64 file
    had 14 of 49 convs and all 9 adds in float, 30 layout transposes, and ran at about fp32's speed; with uint8
    activations every conv and add is int8 and it ran at 0.65x fp32 (BENCHMARKS.md). Arm's kernels take int8
    activations (sdot)."""
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if profile.platform.startswith("amd64") else QuantType.QInt8


def reduces_range(profile: Profile) -> bool:
    """7-bit weights for x86 files. ORT runs int8 convolutions there as uint8 activations x int8 weights, and on
    CPUs without VNNI (AVX2 only) its GEMM kernel adds pairs of products in int16, which full 8-bit weights
    overflow (255*127*2 > 32767): with 8-bit weights, 29 of EfficientNet-Lite0's 33 non-depthwise convs overflow
    some pair sums on 4 of its calibration photos (a numpy emulation of the pairs). Depthwise convs keep 8-bit weights
    (``depthwise_weights``): ORT's depthwise kernel widens to int16 and adds in int32 on every x86 CPU. CPUs with
    VNNI add in int32: ``amd64-vnni`` files keep full 8-bit weights everywhere."""
    return profile.platform == "amd64"


def depthwise_weights(model) -> list[str]:
    """The weight initializers of an ONNX graph's depthwise convolutions (one input and one output channel per
    group: the convolutions ORT runs with its depthwise kernel)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    found = []
    for n in model.graph.node:
        weight = shapes.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if weight and group > 1 and weight[0] == group and weight[1] == 1:
            found.append(n.input[1])
    return found


SEVEN_BIT_QMAX = 64  # quantize_static's symmetric int8 weights with reduce_range: -64..64, scale max |w| / 64


def int8_weight_grid(profile: Profile, activations: str = "static"):
    """The grid ``quantize_static``/``quantize_dynamic`` put each layer's symmetric per-channel weights on (on the
    weights after BatchNorm folding, which scales a channel and its scale alike): +-127, or +-64 for the 7-bit
    weights of a ``reduces_range`` file's convs other than depthwise. See ``rounding``. A per-inference build
    leaves depthwise convs float (``_quantize_dynamic``): they keep their float weights."""
    from edge_pipeline.rounding import QMAX, depthwise, per_channel_grid

    seven_bit = reduces_range(profile)

    def qmax_for(module):
        if depthwise(module):
            return None if activations == "dynamic" else QMAX
        return SEVEN_BIT_QMAX if seven_bit else QMAX

    return per_channel_grid(profile, qmax_for)


WEIGHT_BITS_REASON = {
    True: "7-bit weights: x86 CPUs without VNNI add u8 x s8 products in int16, which 8-bit weights overflow",
    False: "8-bit weights: the target's int8 kernels accumulate in int32 (arm, x86 with VNNI)",
}


def export(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
           profile: Profile, out_dir: Path, iface: ModelInterface, float_layers=(), default_flow: bool = False,
           fixtures: bool = True, qat: dict | None = None, activations: str = "static") -> Path:
    """``qat``: a QAT run's trained state; the int8 model is then the one it learned, not a calibrated one.
    ``activations="dynamic"``: ``_quantize_dynamic``'s file (float I/O)."""
    build = out_dir / "build"
    build.mkdir()
    final = out_dir / "model.onnx"
    rewrites, eight_bit_depthwise = None, 0
    if profile.precision == "int8" and qat is not None:
        qdq, rewrites = _qat_onnx(model, example, calibration, profile, iface, build, qat)
        shutil.copy(qdq, final)
    elif profile.precision == "int8" and activations == "dynamic":
        shutil.copy(_quantize_dynamic(model, example, profile, iface, build, float_layers), final)
    elif profile.precision == "int8":
        qdq, eight_bit_depthwise = _quantize(model, example, calibration, profile, iface, build, float_layers,
                                             default_flow)
        shutil.copy(qdq, final)
    else:
        _float_onnx(model, example, final, iface)
    _strip_build_paths(final)
    to_ort(final, out_dir, converter_platform(profile))
    shutil.rmtree(build)
    seven_bit = profile.precision == "int8" and not default_flow and reduces_range(profile)  # QAT's too
    doc = {**_describe(final, out_dir, float_layers, seven_bit), **activations_entry(profile, activations)}
    if seven_bit:
        doc["depthwise_weights_8bit"] = eight_bit_depthwise
    if profile.precision == "int8":
        doc["weight_bits_reason"] = WEIGHT_BITS_REASON[seven_bit] + f" (platform {profile.platform})"
    if eight_bit_depthwise:
        doc["weight_bits_reason"] += (f"; its {eight_bit_depthwise} depthwise convolutions keep 8-bit weights: ORT's "
                                      "depthwise kernel widens the products to int16 and adds them in int32")
    if rewrites is not None:  # what the QAT export's clean-up changed (fold_clips_and_pads, activations_to_uint8)
        doc["qat_export_rewrites"] = rewrites
    (out_dir / "describe.json").write_text(json.dumps(doc, indent=1))
    if fixtures:
        write_fixtures(out_dir / f"model{SUFFIX}", example, iface)
    return out_dir / f"model{SUFFIX}"


def write_fixtures(path: Path, example: tuple[torch.Tensor, ...], iface: ModelInterface) -> None:
    """Beside the .ort: test_data_set_0 (golden I/O for onnxruntime_perf_test) and ORT's mobile usability
    report, from the model.onnx kept with it. Written only for the artifact lower ships."""
    onnx_path = Path(path).with_suffix(".onnx")
    _write_test_data(onnx_path, example, onnx_path.parent, iface)
    (onnx_path.parent / "mobile_usability.txt").write_text(_mobile_usability(onnx_path))


def layer_errors(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
                 rows: tuple[np.ndarray, ...], profile: Profile, iface: ModelInterface) -> dict[str, float]:
    """Own int8 error (dB) per Conv/Linear (Gemm, MatMul) layer of one calibrated QDQ build, from ORT's
    ``qdq_loss_debug``: every quantized tensor of the QDQ model against the float model's (cumulative SQNR),
    turned into each layer's own share by ``layer_error.blame``. Layers are named by the weight they read."""
    import tempfile

    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    from edge_pipeline.layer_error import blame

    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        qdq, _ = _quantize(model, example, calibration, profile, iface, build)
        acts = {}
        for name, path in (("float", build / "pre.onnx"), ("qdq", qdq)):
            debug.modify_model_output_intermediate_tensors(str(path), str(build / f"{name}.aug.onnx"))
            acts[name] = debug.collect_activations(str(build / f"{name}.aug.onnx"), _reader(rows, iface.input_names))
        errors = debug.compute_activation_error(debug.create_activation_matching(acts["qdq"], acts["float"]))
        graph = onnx.load(str(build / "pre.onnx")).graph
    sqnr = {t: e["xmodel_err"] for t, e in errors.items() if "xmodel_err" in e}
    weights = {t.name for t in graph.initializer}
    ops = []
    for n in graph.node:  # topologically sorted
        layer = next((i.rpartition(".")[0].removeprefix("model.") for i in n.input
                      if i in weights and i.endswith(".weight")), None)
        source = next((i for i in n.input if i and i not in weights), None)
        for out in n.output:
            ops.append((out, layer, source))
    return blame(ops, sqnr)


def nodes_kept_float(float_path: Path, pre_path: Path, layers) -> list[str]:
    """Nodes quantize_static must leave in float: those of the fallback's layers, and those whose tensors can
    carry +-inf (an attention mask filled with -inf: a quantization range over infinity is no range at all).

    A layer's nodes are found exactly by module path: in the pre-processed graph by the name of the weight they
    read (``model.features.1.weight``; quant_pre_process folds BatchNorm into convs and renames them, and drops
    the node metadata), and by the exporter's recorded module paths for nodes whose names survived."""
    import onnx

    pre = onnx.load(str(pre_path))
    wanted = {flat_name(layer) for layer in layers}
    weights = {t.name for t in pre.graph.initializer if t.name.rpartition(".")[0] in wanted}
    by_weight = {n.name for n in pre.graph.node if weights & set(n.input)}
    by_scope = set(onnx_nodes_for(float_path, layers)) & {n.name for n in pre.graph.node}
    return sorted(by_weight | by_scope | set(infinite_nodes(pre)))


ONNX_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")
ONNX_LAYER_OPS = ("Conv", "Gemm", "MatMul")


def output_layer_nodes(model) -> list[str]:
    """The Conv/Gemm/MatMul nodes (and a bias Add after a MatMul) that make the graph's outputs through reshapes
    only: kept float, as the PT2E backends keep them (see ``pt2e.FusedActivations``): one static int8 range
    over every row's logits is wider than the usual top-1 margin where a few rows have very large logits."""
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer}
    found = []
    for out in model.graph.output:
        n = producer.get(out.name)
        while n is not None and n.op_type in ONNX_SHAPE_OPS:
            n = producer.get(n.input[0])
        if n is not None and n.op_type == "Add" and weights & set(n.input):
            found.append(n.name)
            n = next((producer.get(i) for i in n.input if i in producer), None)
        if n is not None and n.op_type in ONNX_LAYER_OPS:
            found.append(n.name)
    return found


def int8_weights_only(path: Path, node_names: set[str]) -> None:
    """The output layers' weights as int8 (symmetric, per output channel) behind a DequantizeLinear: they compute
    in float (their activations stay out of static int8, see ``output_layer_nodes``) but ship at a byte a weight;
    an ImageNet head (1280 x 1000) kept in float32 alone would add 3.8 MB. ORT does not fold a weight's
    DequantizeLinear into a float constant, so the .ort file keeps the int8 tensor."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    uses = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes = []
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.name in node_names and len(n.input) > 1 else None
        if w is None or w.data_type != onnx.TensorProto.FLOAT or uses[w.name] != 1 or len(w.dims) < 2:
            new_nodes.append(n)
            continue
        a = numpy_helper.to_array(w)
        transposed = n.op_type == "Gemm" and any(at.name == "transB" and at.i for at in n.attribute)
        axis = 0 if n.op_type == "Conv" or transposed else a.ndim - 1  # the output channels' axis
        q, scale = symmetric_per_channel(a, axis)
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([numpy_helper.from_array(q, w.name + "_int8"),
                                        numpy_helper.from_array(scale.astype(np.float32), w.name + "_scale"),
                                        numpy_helper.from_array(np.zeros_like(scale, np.int8), w.name + "_zero")])
        new_nodes.append(helper.make_node("DequantizeLinear", [w.name + "_int8", w.name + "_scale", w.name + "_zero"],
                                          [w.name], name=w.name + "_DequantizeLinear", axis=axis))
        new_nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    onnx.save(model, str(path))


def _sentinel(t) -> bool:
    """A float constant holding +-inf or a masking sentinel (``finfo.min``, -1e4, -1e9)."""
    from onnx import numpy_helper

    from edge_pipeline.backends.pt2e import SENTINEL

    if t.data_type not in (1, 10, 11):  # float, float16, double
        return False
    a = numpy_helper.to_array(t)
    return bool(a.size) and (not np.isfinite(a).all() or float(np.abs(a).max()) >= SENTINEL)


def infinite_nodes(model) -> list[str]:
    """Nodes downstream of a constant that holds +-inf or a masking sentinel (a transformer's attention mask:
    Hugging Face fills it with ``finfo(float32).min``), up to and including the Softmax that absorbs it: one
    int8 range over such values leaves every real score in one step."""
    inf = {t.name for t in model.graph.initializer if _sentinel(t)}
    out = []
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        if n.op_type == "Constant" and any(_sentinel(a.t) for a in n.attribute if a.name == "value"):
            inf.update(n.output)
        elif inf & set(n.input):
            out.append(n.name)
            if n.op_type != "Softmax":
                inf.update(n.output)
    return out


def module_paths(node) -> list[str]:
    """The torch module paths an ONNX node came from: the dynamo exporter records them in
    ``pkg.torch.onnx.name_scopes`` as a list, outermost first (``['', 'model', 'model.features.0']``)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(v) for v in json.loads(p.value.replace("'", '"'))]
            except json.JSONDecodeError:
                return []
    return []


def onnx_nodes_for(path: Path, layers) -> list[str]:
    """ONNX node names that come from exactly these torch modules (or from inside them): ``features.1`` never
    matches ``features.10``, and layers named on one source line are told apart by their module paths."""
    if not layers:
        return []
    import onnx

    wanted = {flat_name(layer) for layer in layers}
    return [n.name for n in onnx.load(str(path)).graph.node if wanted & set(module_paths(n))]


def _strip_build_paths(path: Path) -> None:
    """Shipped ONNX keeps each node's module path (name_scopes) but not the exporter's stack traces, which hold
    this machine's source and virtualenv paths."""
    import onnx

    model = onnx.load(str(path))
    for n in model.graph.node:
        keep = [p for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
    onnx.save(model, str(path))


def to_ort(onnx_path: Path, out_dir: Path, platform: str) -> None:
    """ORT format (Fixed style, layouts for the target platform) plus required_operators.config, converted in a
    child process that makes the same bytes from the same model.onnx (see ``ort_format``)."""
    from edge_pipeline.backends import ort_format

    ort_format.convert(Path(onnx_path), Path(out_dir), platform)
    for cfg in out_dir.glob("*required_operators*.config"):
        # The converter lists the model it read by its full path (a temporary build folder): name it alone.
        lines = [f"# - {Path(ln[4:]).name}" if ln.startswith("# - ") else ln for ln in cfg.read_text().splitlines()]
        (out_dir / "required_operators.config").write_text("\n".join(lines) + "\n")
        if cfg.name != "required_operators.config":
            cfg.unlink()


def _mobile_usability(onnx_path: Path) -> str:
    """ORT's mobile usability report (NNAPI / CoreML partitions), as its command-line checker words it, with
    the model named alone rather than by this machine's full path."""
    import io
    import logging

    from onnxruntime.tools.mobile_helpers import usability_checker

    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
    log = logging.getLogger("edge_pipeline.ort_usability")
    log.propagate, log.handlers = False, [handler]
    log.setLevel(logging.INFO)
    usability_checker.analyze_model(Path(onnx_path), skip_optimize=False, logger=log)
    report = text.getvalue()
    for folder in {str(Path(onnx_path).parent.resolve()), str(Path(onnx_path).parent)}:
        report = report.replace(folder + "/", "")
    return report


def ort_content_sha256(path: Path) -> str:
    """sha256 of an .ort file's content: the model's bytes (graph and weights: reproducible) plus the resolver's
    entries in sorted order, so two conversions of the same model give the same digest."""
    import hashlib

    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    buf = Path(path).read_bytes()
    session = InferenceSession.GetRootAsInferenceSession(buf, 0)
    model, resolver = session.Model(), session.KernelTypeStrResolver()
    if model is None or resolver is None or resolver._tab.Pos > model._tab.Pos:
        return hashlib.sha256(buf).hexdigest()  # not the layout this was written for: the plain digest
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        op = resolver.OpKernelTypeStrArgs(i)
        args = []
        for j in range(op.KernelTypeStrArgsLength()):
            a = op.KernelTypeStrArgs(j)
            args.append([a.KernelTypeStr().decode(), sorted([a.Args(k).ArgType(), a.Args(k).Index()]
                                                            for k in range(a.ArgsLength()))])
        entries.append([op.OpId().decode(), sorted(args)])
    h = hashlib.sha256(buf[model._tab.Pos:])
    h.update(json.dumps(sorted(entries)).encode())
    return h.hexdigest()


def _write_test_data(onnx_path: Path, example: tuple[torch.Tensor, ...], out_dir: Path,
                     iface: ModelInterface) -> None:
    """test_data_set_0/input_<i>.pb and output_<i>.pb, as onnx_test_runner and onnxruntime_perf_test read them."""
    import onnxruntime as ort
    from onnx import numpy_helper

    xs = {n: t.numpy() for n, t in zip(iface.input_names, example, strict=True)}
    ys = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, xs)
    d = out_dir / "test_data_set_0"
    d.mkdir()
    for i, (n, x) in enumerate(xs.items()):
        (d / f"input_{i}.pb").write_bytes(numpy_helper.from_array(x, n).SerializeToString())
    for i, (n, y) in enumerate(zip(iface.output_names, ys, strict=True)):
        (d / f"output_{i}.pb").write_bytes(numpy_helper.from_array(y, n).SerializeToString())


def _describe(onnx_path: Path, out_dir: Path, float_layers, reduce_range: bool) -> dict:
    import onnx

    m = onnx.load(str(onnx_path))
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    def io(vs):
        return [{"name": v.name, "shape": [d.dim_value for d in v.type.tensor_type.shape.dim],
                          "elem_type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)} for v in vs]
    req = out_dir / "required_operators.config"
    return {"backend": "onnxruntime", "format": "ORT (Fixed)", "ops": ops, "weights_7bit": reduce_range,
            "inputs": io(m.graph.input),
            "outputs": io(m.graph.output), "float_layers": list(float_layers),
            "required_operators": req.read_text().splitlines() if req.is_file() else None,
            "quantized_io": None, "ort_content_sha256": ort_content_sha256(out_dir / f"model{SUFFIX}")}


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())


ORT_FLOAT, ORT_INT8, ORT_UINT8 = 1, 3, 2  # ONNX TensorProto data types


def weights(path: Path) -> dict[str, tuple]:
    """The ORT-format file's weight initializers (float or int8, two or more dimensions), read with ORT's own
    flatbuffer schema, each with the axis of the DequantizeLinear that reads it where its scale is per channel."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    graph = InferenceSession.InferenceSession.GetRootAs(Path(path).read_bytes(), 0).Model().Graph()
    tensors = {t.Name().decode(): t for t in (graph.Initializers(i) for i in range(graph.InitializersLength()))}
    # (weight input, scale input, the per-channel axis) of the ops that read int8 weights; the .ort file holds
    # fused QLinearConv/QLinearMatMul where ORT's optimizer fused the DequantizeLinear into its op.
    readers = {b"DequantizeLinear": (0, 1, None), b"QLinearConv": (3, 4, 0), b"QLinearMatMul": (3, 4, 1)}
    axes = {}
    for node in (graph.Nodes(i) for i in range(graph.NodesLength())):
        w, sc, axis = readers.get(node.OpType(), (None, None, None))
        if w is None or node.InputsLength() <= sc:
            continue
        scale = tensors.get(node.Inputs(sc).decode())
        if scale is not None and scale.DimsLength() == 1 and int(scale.DimsAsNumpy()[0]) > 1:
            if axis is None:  # DequantizeLinear's own attribute (default 1)
                attrs = (node.Attributes(j) for j in range(node.AttributesLength()))
                axis = next((a.I() for a in attrs if a.Name() == b"axis"), 1)
            axes[node.Inputs(w).decode()] = axis
    dtypes = {ORT_FLOAT: np.float32, ORT_INT8: np.int8, ORT_UINT8: np.uint8}
    out = {}
    for name, t in tensors.items():
        if t.DataType() not in dtypes or t.DimsLength() < 2 or t.RawDataIsNone():
            continue
        dims = tuple(int(d) for d in t.DimsAsNumpy())
        out[name] = (np.frombuffer(t.RawDataAsNumpy().tobytes(), dtypes[t.DataType()]).reshape(dims), axes.get(name))
    return out


def parse_onnxruntime_perf_test(text: str) -> dict:
    """``onnxruntime_perf_test -m times``: session creation (s), mean (ms), min/max/percentiles (s), peak
    working set (bytes)."""
    avg = re.search(r"Average inference time cost:\s*" + NUM + r"\s*ms", text)
    if not avg:
        raise ValueError("no 'Average inference time cost' line in onnxruntime_perf_test output")
    given: dict = {"mean_ms": float(avg.group(1))}
    if m := re.search(r"Total inference requests:\s*(\d+)", text):
        given["runs"] = int(m.group(1))
    for key, label in (("min_ms", "Min"), ("max_ms", "Max"), ("p50_ms", "P50"), ("p90_ms", "P90"),
                       ("p99_ms", "P99")):
        if m := re.search(label + r" Latency(?: is|:)\s*" + NUM + r"\s*(?:sec|s)\b", text):
            given[key] = float(m.group(1)) * 1e3
    if "p50_ms" in given:
        given["p50_basis"] = "P50 the tool printed"
    out: dict = {"latency": latency(**given)}
    if m := re.search(r"Session creation time cost:\s*" + NUM + r"\s*s", text):
        out["init_ms"] = float(m.group(1)) * 1e3
    m = re.search(r"Peak working set size:\s*(\d+)\s*bytes", text)
    out["memory"] = ({"model_bytes": int(m.group(1)),
                      "source": "onnxruntime_perf_test: peak working set of the tool's process"}
                     if m else {"model_bytes": None, "source": "onnxruntime_perf_test printed no memory figure"})
    return out


def _tool_argv(tool: str, target_dir: Path, threads: int, runs: int, warmup: int) -> list[str]:
    return [tool, "-m", "times", "-r", str(runs), "-x", str(threads), "-e", "cpu", "model.ort"]


# onnxruntime_perf_test reads the golden inputs from test_data_set_0/ beside the model.
DEVICE_TOOL = DeviceTool("onnxruntime_perf_test", lambda d: [d / "model.ort", d / "test_data_set_0"], _tool_argv,
                         parse_onnxruntime_perf_test)


BACKEND = Backend(
    "onnxruntime", "ONNX Runtime, ORT format for its mobile build (.ort)", ".ort",
    packages=("torch", "onnx", "onnxscript", "onnxruntime"), targets=("ort-mobile-int8", "ort-mobile-fp32"),
    qat=True, layer_errors=True, dynamic_activations=True,
    calibration_methods=tuple(ORT_METHODS), platforms=("arm", "amd64", "amd64-vnni"), device_tool=DEVICE_TOOL,
    weights=weights)
