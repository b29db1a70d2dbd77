"""ONNX Runtime for .onnx and .ort files (the CPU execution provider)."""

from __future__ import annotations

import numpy as np

SUFFIXES = (".onnx", ".ort")
SIDECARS = ()

_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
          "tensor(bool)": np.bool_, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def load() -> None:
    import onnxruntime  # noqa: F401


def open_model(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    dtypes = [_TYPES.get(i.type) for i in sess.get_inputs()]

    def run(xs):
        return sess.run(None, {n: x if d is None or x.dtype == d else x.astype(d)
                               for n, x, d in zip(names, xs, dtypes)})  # noqa: B905 - boards may run Python < 3.10

    return "onnxruntime", run


OVERHEAD_OPS = {"Pad": "pad", "QuantizeLinear": "convert", "DequantizeLinear": "convert", "Cast": "convert",
                "Transpose": "transpose", "ReorderInput": "transpose", "ReorderOutput": "transpose"}


def profile(path: str, inputs, threads: int, runs: int, folder: str) -> list[dict]:
    """Per-node times from ONNX Runtime's own profiler (``enable_profiling``): each node's median over ``runs``
    runs, from the "Node" events of its JSON trace (durations in microseconds)."""
    import json
    import os

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(folder, "ort-profile")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {i.name: x.astype(_TYPES.get(i.type) or x.dtype) for i, x in zip(sess.get_inputs(), inputs)}  # noqa: B905
    for _ in range(runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    times: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            times.setdefault(node, []).append(e["dur"] / 1e3)
            kinds[node] = e.get("args", {}).get("op_name", node)
    return [{"name": n, "kind": kinds[n], "ms": sorted(t)[len(t) // 2], "overhead": OVERHEAD_OPS.get(kinds[n])}
            for n, t in times.items()]
