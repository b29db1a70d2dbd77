"""TFLite/LiteRT: litert-torch conversion, int8 through its PT2E quantizer; no TensorFlow needed."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import Backend, DeviceTool, activations_entry, pt2e
from edge_pipeline.devices.tool_output import latency
from edge_pipeline.errors import PipelineError
from edge_pipeline.harness.runtime_tflite import tflite_io
from edge_pipeline.interface import ModelInterface
from edge_pipeline.targets import Profile

SUFFIX = ".tflite"


def _quantizers(profile: Profile, float_layers, default: bool = False, dynamic: bool = False):
    """(the quantizer litert-torch converts with, the one that annotates and calibrates)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    if default:  # the quantizer's own defaults
        q = PT2EQuantizer().set_global(get_symmetric_quantization_config())
        return q, q
    module_names_in_quantizer()
    if dynamic:  # LiteRT's dynamic-range kernels: int8 weights, each op quantizes its float input per inference
        q = PT2EQuantizer().set_global(get_symmetric_quantization_config(
            is_per_channel=profile.quantization.per_channel, is_dynamic=True))
        pt2e.keep_float(q, float_layers)
        return q, q
    base = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel, is_dynamic=False)
    q = PT2EQuantizer().set_global(pt2e.configure(base, profile))
    pt2e.keep_float(q, float_layers)
    # keep_outputs=False: litert-torch gives int8 outputs whatever the annotation (a float or dynamic head made
    # no difference to the converted file): the outputs stay static int8, over the range fitted to the rows
    # (pt2e.fit_output_ranges).
    return q, pt2e.FusedActivations(
        q, keep_outputs=False, per_tensor_layers=profile.quantization.per_tensor_layers,
        per_tensor_weight=get_symmetric_quantization_config(is_per_channel=False, is_dynamic=False).weight)


def module_names_in_quantizer() -> None:
    """Let litert-torch's quantizer find a module by name again. Its filter reads the module path from the keys
    of a node's ``nn_module_stack`` after a ``"L__self___"`` prefix, which torch.export no longer writes
    (torch 2.13: key ``"L__self__model.3"``, value ``("model.3", type)``): no name matched, so every per-module
    config (the fallback's float layers, per-tensor layers, output layers) was silently ignored and those
    layers were quantized with the global config. The replacement reads the path from the value, as torchao's
    XNNPACK quantizer does (litert-torch pinned in pyproject)."""
    from litert_torch.quantize import pt2e_quantizer

    def module_name_filter(module_name: str):
        def matches(n) -> bool:
            return module_name in [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()]
        return matches

    pt2e_quantizer._get_module_name_filter = module_name_filter


@contextlib.contextmanager
def strict_qdq(on: bool):
    """Convert in the LiteRT converter's strict QDQ mode: an op is int8 only where the graph quantizes it. By
    default the converter also int8-converts a float op between a dequantize and a quantize (its own weight
    scales), so the fallback's float layers came out int8 all the same. Strict mode keeps them float, and keeps
    the graph's first quantize and last dequantize as ops: the file then takes float inputs and outputs
    (describe.json's ``quantized_io`` says which), hence only where a layer is kept float."""
    if not on:
        yield
        return
    from litert_torch._convert import litert_converter

    ext = litert_converter.converter_api_ext
    default = ext.ConvertToTFLConfig

    def config():
        made = default()
        made.strict_qdq_mode = True
        return made

    ext.ConvertToTFLConfig = config
    try:
        yield
    finally:
        ext.ConvertToTFLConfig = default


def _constant_pad_nhwc(x, pad, value=0.0):
    """``aten.constant_pad_nd`` of an NCHW graph, applied to the NHWC tensor that stands for it."""
    pairs = [list(pad[i:i + 2]) for i in range(0, len(pad), 2)] + [[0, 0]] * (4 - len(pad) // 2)
    w, h, c, n = pairs  # torch lists (before, after) pairs from the last dimension backwards
    return torch.ops.aten.constant_pad_nd.default(x, [*c, *w, *h, *n], value)


def pads_in_nhwc() -> None:
    """Let litert-torch's layout pass keep 4-D zero pads in NHWC like the convolutions around them.

    Its pass moves a graph to NHWC op by op where it has a rewrite rule for the op, and has none for
    ``constant_pad_nd``: each pad then runs in NCHW between two transposes. In fp32 the TFLite converter moves
    those transposes away and folds the pad into its convolution; in int8 the transposes sit between
    quantize/dequantize pairs and stay: EfficientNet-Lite0's int8 file had 33 int8 TRANSPOSE ops (1 in fp32)
    around 17 PADs. The rule is registered in the pass's own registry (litert-torch pinned in pyproject)."""
    from litert_torch._convert.fx_passes.optimize_layout_transposes_pass import layout_rewrite

    def rewrite(node):
        node.target = _constant_pad_nhwc

    layout_rewrite.rewriters.setdefault(torch.ops.aten.constant_pad_nd.default, rewrite)


def export(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
           profile: Profile, out_dir: Path, iface: ModelInterface, float_layers=(), default_flow: bool = False,
           fixtures: bool = True, qat: dict | None = None, activations: str = "static") -> Path:
    """``qat``: a QAT run's trained state; the int8 model is then the one it learned, not a calibrated one.
    ``activations="dynamic"``: int8 weights, activations quantized per inference; the file's I/O is float."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    model = model.eval()
    path = out_dir / f"model{SUFFIX}"
    pads_in_nhwc()
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
        q, quantizer = _quantizers(profile, float_layers, default_flow, dynamic=activations == "dynamic")
        gm = pt2e.quantize(model, calibration, quantizer, fold_quantize=False)
        with strict_qdq(bool(float_layers)):
            edge = litert_torch.convert(gm, example, quant_config=QuantConfig(pt2e_quantizer=q))
    else:
        edge = litert_torch.convert(model, example)
    edge.export(str(path))
    return _finish(path, out_dir, example, iface, float_layers, fixtures, activations_entry(profile, activations))


def _finish(path: Path, out_dir: Path, example, iface: ModelInterface, float_layers, fixtures: bool,
            extra: dict | None = None) -> Path:
    doc = {**_describe(path, iface, float_layers), **(extra or {})}
    (out_dir / "describe.json").write_text(json.dumps(doc, indent=1))
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
    ins, outs = tflite_io(it)
    inputs, outputs = io(ins, iface.inputs), io(outs, iface.outputs)
    return {"backend": "tflite", "ops": ops, "inputs": inputs, "outputs": outputs, "float_layers": list(float_layers),
            "quantized_io": {"inputs": {d["name"]: d["quantization"] for d in inputs},
                             "outputs": {d["name"]: d["quantization"] for d in outputs}}}


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def weights(path: Path) -> dict[str, tuple]:
    """Each conv/fully-connected op's weight tensor as stored in the .tflite file, with its per-channel axis."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()
    produced = {o for op in ops for o in op["outputs"]} | {d["index"] for d in it.get_input_details()}
    out = {}
    for op in ops:
        if op["op_name"] not in WEIGHTED_OPS or len(op["inputs"]) < 2 or op["inputs"][1] in produced:
            continue
        d = details[op["inputs"][1]]
        q = d.get("quantization_parameters") or {}
        per_channel = len(q.get("scales", ())) > 1
        out[d["name"] or f"tensor_{d['index']}"] = (it.get_tensor(d["index"]).copy(),
                                                    int(q["quantized_dimension"]) if per_channel else None)
    return out


def parse_benchmark_model(text: str) -> dict:
    """LiteRT ``benchmark_model``: init, first inference, the timed runs' count/min/max/avg/std (us), and the
    memory footprint delta from the tool's start (MB)."""
    m = re.search(r"Inference timings in us: Init: ([\d.]+), First inference: ([\d.]+), "
                  r"Warmup \(avg\): ([\d.]+), Inference \(avg\): ([\d.]+)", text)
    if not m:
        raise ValueError("no 'Inference timings in us' line in benchmark_model output")
    init, first, _warm, avg = (float(g) for g in m.groups())
    given = {"mean_ms": avg / 1e3}
    runs = re.findall(r"count=(\d+) first=\d+ curr=\d+ min=(\d+) max=(\d+) avg=([\d.]+) std=(\d+)"
                      r"(?: p5=\d+ median=(\d+) p95=\d+)?", text)
    if runs:  # the last block is the timed runs (the first is the warm-up)
        count, mn, mx, _avg, std, median = runs[-1]
        given.update(runs=int(count), min_ms=int(mn) / 1e3, max_ms=int(mx) / 1e3, std_ms=int(std) / 1e3)
        if median:
            given.update(p50_ms=int(median) / 1e3, p50_basis="median the tool printed")
    out = {"init_ms": init / 1e3, "first_inference_ms": first / 1e3, "latency": latency(**given)}
    mem = re.search(r"(?:Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): "
                    r"init=([\d.]+) overall=([\d.]+)", text)
    out["memory"] = ({"model_bytes": int(float(mem.group(2)) * 2 ** 20),
                      "source": "benchmark_model: memory footprint delta from the tool's start (overall)"}
                     if mem else {"model_bytes": None, "source": "benchmark_model printed no memory figure"})
    return out


def _tool_inputs(target_dir: Path) -> tuple[list[str], list[Path]]:
    specs = describe(target_dir / "model.tflite")["inputs"]
    return [s.get("tensor", s["name"]) for s in specs], [target_dir / f"input_{i}.raw" for i in range(len(specs))]


def _tool_argv(tool: str, target_dir: Path, threads: int, runs: int, warmup: int) -> list[str]:
    names, raws = _tool_inputs(target_dir)  # the file's own input tensor names
    files = ",".join(f"{n.replace(':', '::')}:{r.name}" for n, r in zip(names, raws, strict=True))
    return [tool, "--graph=model.tflite", f"--num_threads={threads}", f"--num_runs={runs}",
            f"--warmup_runs={warmup}", "--input_layer=" + ",".join(names), "--input_layer_value_files=" + files]


# What compute nothing of the model's: LiteRT's own kernels and XNNPACK's (the delegate's ops are named by it).
OVERHEAD_OPS = (("PAD", "pad"), ("Constant Pad", "pad"), ("QUANTIZE", "convert"), ("DEQUANTIZE", "convert"),
                ("Convert", "convert"), ("TRANSPOSE", "transpose"), ("Transpose", "transpose"), ("Copy", "copy"))


def parse_op_profile(text: str) -> list[dict]:
    """``benchmark_model --enable_op_profiling=true``: the benchmark run's "Run Order" table (the last one: the
    first is the initialization's), one row per executed node (``times called`` > 0): node type, average ms,
    name; XNNPACK's ops inside the delegate are listed by their own names."""
    tables = re.findall(r"=+ Run Order =+\n(.*?)(?:\n\s*\n|\Z)", text, re.S)
    if not tables:
        raise ValueError("no 'Run Order' table in benchmark_model output (was --enable_op_profiling=true given?)")
    lines = tables[-1].splitlines()
    header = [h.strip() for h in re.findall(r"\[([^\]]+)\]", lines[0])]
    rows = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().split("\t")]
        if len(cells) != len(header):
            continue
        row = dict(zip(header, cells, strict=True))
        if int(row.get("times called", "1")) == 0:
            continue  # set-up work (AllocateTensors), not a run's
        kind = row["node type"]
        rows.append({"name": row["Name"], "kind": kind, "ms": float(row["avg ms"]),
                     "overhead": next((c for p, c in OVERHEAD_OPS if kind.startswith(p)), None)})
    return rows


DEVICE_TOOL = DeviceTool("benchmark_model", lambda d: [d / "model.tflite", *_tool_inputs(d)[1]], _tool_argv,
                         parse_benchmark_model, profile_flags=("--enable_op_profiling=true",),
                         parse_profile=parse_op_profile)


int8_weight_grid = pt2e.int8_weight_grid  # see rounding.py


BACKEND = Backend(
    "tflite", "LiteRT (TFLite) through litert-torch (.tflite)", ".tflite",
    packages=("torch", "litert-torch", "ai-edge-litert"), targets=("tflite-int8", "tflite-fp32"),
    qat=True, dynamic_activations=True, calibration_methods=pt2e.PT2E_METHODS, device_tool=DEVICE_TOOL,
    weights=weights)
