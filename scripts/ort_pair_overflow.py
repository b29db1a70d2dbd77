"""Why ORT's amd64 files (x86 without VNNI) need 7-bit weights: on AVX2, ORT's int8 GEMM multiplies uint8
activations by int8 weights and adds each pair of neighbouring products in int16 (vpmaddubsw), which saturates
above 32767. This emulates those pair sums in numpy for EfficientNet-Lite0's amd64-vnni file (full 8-bit weights)
on a few of the labelled recipe's calibration photos: per non-depthwise conv, how many pair sums leave int16, in
the order ORT's channels-last im2col gives the reduction (kernel row, kernel column, input channel). Depthwise
convs are left out: ORT's depthwise kernel widens to int16 and adds in int32.

    .venv/bin/python scripts/ort_pair_overflow.py [ROWS] > ort_pair_overflow.json
"""

import json
import sys

import numpy as np
from labelled_lite0 import setup

from edge_pipeline.backends import onnxruntime as ob
from edge_pipeline.evaluation import example_inputs
from edge_pipeline.interface import FlatModel
from edge_pipeline.targets import load_profile


def conv_inputs(qdq_path, rows: np.ndarray) -> tuple[list, dict]:
    """(conv name, its uint8 input tensor, int8 weights, attributes) of every non-depthwise conv reading a
    DequantizeLinear, and each uint8 input's values on ``rows`` (graph optimizations off: the file as written)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(qdq_path))
    consts = ob._constants(model.graph)
    made_by = {o: n for n in model.graph.node for o in n.output}
    convs = []
    for n in model.graph.node:
        x, w = made_by.get(n.input[0]), made_by.get(n.input[1]) if len(n.input) > 1 else None
        if n.op_type != "Conv" or not x or not w or x.op_type != "DequantizeLinear" or w.input[0] not in consts:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        weights = consts[w.input[0]]
        if attrs.get("group", 1) == weights.shape[0] > 1:
            continue
        zero_point = int(consts[x.input[2]]) if len(x.input) > 2 else 0
        convs.append((n.name, x.input[0], zero_point, weights, attrs))
    names = sorted({c[1] for c in convs})
    model.graph.output.extend(onnx.helper.make_value_info(n, onnx.TypeProto()) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    runs = [session.run(names, {feed: rows[i:i + 1]}) for i in range(len(rows))]
    return convs, {n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}


def pair_sums_over_int16(x: np.ndarray, zero_point: int, weights: np.ndarray, attrs: dict) -> tuple[int, int, int]:
    """(pair sums beyond int16, all pair sums, the largest magnitude) of one conv over its uint8 input."""
    out_ch, group_ch, kh, kw = weights.shape
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    sh, sw = attrs.get("strides", [1, 1])
    group = attrs.get("group", 1)
    x = np.pad(x.astype(np.int32), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=zero_point)
    n, _, h, w = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    over = total = largest = 0
    for g in range(group):
        xs = x[:, g * group_ch:(g + 1) * group_ch]
        ws = weights[g * (out_ch // group):(g + 1) * (out_ch // group)].astype(np.int32)
        cols = np.stack([np.stack([xs[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] for j in range(kw)], -1)
                         for i in range(kh)], -2)  # (n, channels, ho, wo, kh, kw)
        a = cols.transpose(0, 2, 3, 4, 5, 1).reshape(n * ho * wo, -1)  # reduction order (kh, kw, channel)
        b = ws.transpose(0, 2, 3, 1).reshape(len(ws), -1)
        if a.shape[1] % 2:
            a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 0), (0, 1)))
        for k in range(0, a.shape[1], 2):
            pair = np.outer(a[:, k], b[:, k]) + np.outer(a[:, k + 1], b[:, k + 1])
            over += int(((pair > 32767) | (pair < -32768)).sum())
            total += pair.size
            largest = max(largest, int(np.abs(pair).max()))
    return over, total, largest


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    lite0 = setup()
    folder = lite0.tmp / "vnni"
    folder.mkdir()
    ob.export(FlatModel(lite0.model), example_inputs(lite0.data), lite0.calibration,
              load_profile("ort-x86-vnni-int8"), folder, lite0.iface, fixtures=False)
    convs, inputs = conv_inputs(folder / "model.onnx", lite0.calibration[0][:rows])
    out = {"rows": rows, "convs": {}}
    for name, tensor, zero_point, weights, attrs in convs:
        over, total, largest = pair_sums_over_int16(inputs[tensor], zero_point, weights, attrs)
        out["convs"][name] = {"shape": list(weights.shape), "pairs_over_int16": over, "pairs": total,
                              "largest": largest}
    out["convs_overflowing"] = sum(c["pairs_over_int16"] > 0 for c in out["convs"].values())
    out["convs_checked"] = len(out["convs"])
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
