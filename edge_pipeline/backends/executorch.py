"""ExecuTorch: torch.export -> PT2E (XNNPACKQuantizer) -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_pipeline.backends import Backend, DeviceTool, activations_entry, pt2e
from edge_pipeline.devices.tool_output import NUM, latency
from edge_pipeline.interface import ModelInterface
from edge_pipeline.targets import Profile

SUFFIX = ".pte"


def _quantizer(profile: Profile, float_layers, default: bool = False, dynamic: bool = False):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    if dynamic:  # XNNPACK's qd8 convs and GEMMs: per-channel int8 weights (the only kind they take), float between
        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
        pt2e.keep_float(q, float_layers)
        return q
    if default:  # the quantizer's own defaults, as its documentation calls it
        q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    else:
        base = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel)
        q = XNNPACKQuantizer().set_global(pt2e.configure(base, profile))
    pt2e.keep_float(q, float_layers)
    # The output layers dynamically quantized where weights are per channel: int8 weights, float outputs
    # (XNNPACK's qd8 GEMM, which takes per-channel weights only); float where one scale per tensor is asked.
    per_channel = profile.quantization.per_channel
    head = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True) if per_channel else None
    return q if default else pt2e.FusedActivations(
        q, output_layers=head, pads_into_convs=True, per_tensor_layers=profile.quantization.per_tensor_layers,
        per_tensor_weight=get_symmetric_quantization_config(is_per_channel=False).weight)


def qat_quantizer(profile: Profile):
    """XNNPACK's own QAT config (fake quantizers with moving-average ranges), with the profile's weight
    granularity; bounded activations fused into the op before them as in post-training int8."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel, is_qat=True)
    return pt2e.FusedActivations(XNNPACKQuantizer().set_global(config), keep_outputs=False)


def layer_errors(model: nn.Module, example, calibration: tuple[np.ndarray, ...], rows: tuple[np.ndarray, ...],
                 profile: Profile, iface: ModelInterface) -> dict[str, float]:
    """Own int8 error (dB) per layer of one calibrated build with this profile's quantizer (torchao's debugger)."""
    return pt2e.layer_errors(model.eval(), calibration, rows, _quantizer(profile, ()))


def export(model: nn.Module, example: tuple[torch.Tensor, ...], calibration: tuple[np.ndarray, ...],
           profile: Profile, out_dir: Path, iface: ModelInterface, float_layers=(), default_flow: bool = False,
           fixtures: bool = True, qat: dict | None = None, activations: str = "static") -> Path:
    """``qat``: a QAT run's trained state; the int8 model is then the one it learned, not a calibrated one.
    ``activations="dynamic"``: int8 weights, activations quantized per inference by XNNPACK (see
    ``backends.DYNAMIC_REASON``); depthwise convs, which XNNPACK has no dynamic kernel for, stay float."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    if profile.precision == "int8" and qat is not None:
        model = pt2e.convert_qat(model, calibration, qat_quantizer(profile), qat)
    elif profile.precision == "int8":
        if activations == "dynamic":
            # XNNPACK's channels-last pass fails on a batched matmul's expand in a dynamically quantized graph
            # ("required rank 4 tensor to use channels_last format": EfficientViT-M0's attention blocks, built
            # statically without complaint): the modules that multiply two activations stay float there.
            products = pt2e.activation_product_modules(model, example)
            float_layers = tuple(float_layers) + tuple(m for m in products if m not in float_layers)
        model = pt2e.quantize(model, calibration,
                              _quantizer(profile, float_layers, default_flow, dynamic=activations == "dynamic"))
    ep = _export_for_xnnpack(model, example)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph
    ops = Counter(str(n.target) for n in graph.nodes if n.op == "call_function")
    delegated = sum(c for op, c in ops.items() if "executorch_call_delegate" in op)
    portable = {op: c for op, c in ops.items() if "executorch_call_delegate" not in op and "getitem" not in op}
    prog = edge.to_executorch()
    path = out_dir / f"model{SUFFIX}"
    path.write_bytes(prog.buffer)
    info = {"backend": "executorch", "delegate": "XnnpackBackend", "delegated_subgraphs": delegated,
            "portable_ops": portable, "coverage": f"{delegated} XNNPACK subgraph(s); portable: {portable or 'none'}",
            "float_layers": list(float_layers), **iface.to_dict(), "quantized_io": None,
            **activations_entry(profile, activations)}
    (out_dir / "describe.json").write_text(json.dumps(info, indent=1))
    if fixtures:
        write_fixtures(path, example, iface)
    return path


def _export_for_xnnpack(model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export, with each PReLU whose input is not 4-D rewritten as ``relu(x) + w * (x - relu(x))``: the
    same function, in ops XNNPACK takes. XNNPACK's channels-last pass asserts on a PReLU after a Linear (as in
    MTCNN's ONet), in fp32 and int8 alike."""
    ep = torch.export.export(model, example)
    gm = ep.module()
    aten, graph = torch.ops.aten, gm.graph
    rewritten = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target != aten.prelu.default:
            continue
        x, w = n.args[0], n.args[1]
        val = x.meta.get("val")
        if val is None or val.dim() == 4:
            continue
        with graph.inserting_before(n):
            if val.dim() > 2:  # the weight is per channel (dim 1): broadcast it over the dims after
                w = graph.call_function(aten.view.default, (w, [-1] + [1] * (val.dim() - 2)))
            pos = graph.call_function(aten.relu.default, (x,))
            neg = graph.call_function(aten.sub.Tensor, (x, pos))
            out = graph.call_function(aten.add.Tensor, (pos, graph.call_function(aten.mul.Tensor, (neg, w))))
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        rewritten += 1
    if not rewritten:
        return ep
    gm.recompile()
    return torch.export.export(gm, example)


def write_fixtures(path: Path, example: tuple[torch.Tensor, ...], iface: ModelInterface) -> None:
    """A BundledProgram (.bpte) beside the .pte: the program plus golden inputs and the outputs this machine's
    ExecuTorch runtime gives for them, which executor_runner --bundleio checks a device against. Written only
    for the artifact lower ships, from the file alone."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    from edge_pipeline.harness import runner as harness

    expected = harness.Model(str(path), 1).run([t.numpy() for t in example])
    case = MethodTestCase(inputs=list(example), expected_outputs=[torch.from_numpy(np.asarray(y)) for y in expected])
    bundled = BundledProgram(None, [MethodTestSuite(method_name="forward", test_cases=[case])],
                             pte_file_path=str(path))
    (Path(path).parent / "model.bpte").write_bytes(serialize_from_bundled_program_to_flatbuffer(bundled))


def describe(path: Path) -> dict:
    return json.loads((Path(path).parent / "describe.json").read_text())


def parse_executor_runner(text: str) -> dict:
    """ExecuTorch ``executor_runner``: load time, each execution's time ("Iteration i of N: t ms"; older builds
    print only the total), the memory-planned buffers, and the bundled-IO verdict with its error stats."""
    m = re.search(r"Model executed successfully (\d+) time\(s\) in " + NUM + " ms", text)
    if not m:
        raise ValueError("no 'Model executed successfully' line in executor_runner output")
    n, total = int(m.group(1)), float(m.group(2))
    times = [float(t) for t in re.findall(r"Iteration \d+ of \d+: " + NUM + " ms", text)]
    out: dict = {"latency": latency(times) if times else latency(mean_ms=total / n, runs=n)}
    if load := re.search(r"Model loaded in " + NUM + " ms", text):
        out["init_ms"] = float(load.group(1))
    planned = [int(b) for b in re.findall(r"Setting up (?:CPU )?planned buffer \d+, size (\d+)", text)]
    out["memory"] = ({"planned_bytes": sum(planned), "model_bytes": None,
                      "source": "executor_runner: memory-planned buffers (activations) from its log"}
                     if planned else {"model_bytes": None, "source": "executor_runner printed no memory figure"})
    if "Test_result: PASS" in text:
        out["bundled_io"] = {"ok": True}
    elif "Test_result: FAIL" in text or "Bundle verification failed" in text:
        out["bundled_io"] = {"ok": False}
    if "bundled_io" in out:
        for key in ("max_absolute_error", "mean_absolute_error", "max_relative_error"):
            if e := re.search(key + r":\s*" + NUM, text):
                out["bundled_io"][key] = float(e.group(1))
    return out


def _tool_argv(tool: str, target_dir: Path, threads: int, runs: int, warmup: int) -> list[str]:
    return [tool, "--model_path=model.bpte", f"--num_executions={runs}", f"--cpu_threads={threads}",
            "--output_file=output", "--print_output=none"]


# executor_runner built with bundled IO: it checks the device's outputs against those recorded at lowering and
# writes them (--output_file) for the host to compare with its own run.
DEVICE_TOOL = DeviceTool("executor_runner", lambda d: [d / "model.bpte"], _tool_argv, parse_executor_runner,
                         writes_outputs=True)


def int8_weight_grid(profile: Profile, activations: str = "static"):
    """PT2E's grid (see rounding.py). XNNPACK's per-inference (qd8) annotator quantizes 2-D convs other than
    depthwise and Linears only: in such a build the others are float and keep their float weights."""
    from edge_pipeline.rounding import depthwise

    return pt2e.int8_weight_grid(profile, activations,
                                 lambda module: depthwise(module) or not isinstance(module, (nn.Conv2d, nn.Linear)))


BACKEND = Backend(
    "executorch", "ExecuTorch with the XNNPACK delegate (.pte)", ".pte", packages=("torch", "executorch"),
    targets=("executorch-xnnpack-int8", "executorch-xnnpack-fp32"),
    qat=True, layer_errors=True, dynamic_activations=True, calibration_methods=pt2e.PT2E_METHODS,
    device_tool=DEVICE_TOOL,
    notes={"weights": "the weights sit inside the XNNPACK delegate's serialized blob, not in the program's tensors"})
