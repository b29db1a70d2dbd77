"""ONNX Runtime for .onnx and .ort files (the CPU execution provider)."""

from __future__ import annotations

import numpy as np

SUFFIXES = (".onnx", ".ort")
SIDECARS = ()

_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
          "tensor(bool)": np.bool_, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def load() -> None:
    import onnxruntime  # noqa: F401


def _session(path: str, threads: int, profile_prefix: str | None = None):
    """A CPU session on ``threads`` intra-op threads, one inter-op; profiling into ``profile_prefix`` if given."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feed(sess, xs) -> dict:
    """Inputs by name, each cast to the model's own input dtype."""
    return {i.name: x if _TYPES.get(i.type) in (None, x.dtype) else x.astype(_TYPES[i.type])
            for i, x in zip(sess.get_inputs(), xs)}  # noqa: B905 - boards may run Python < 3.10


def open_model(path: str, threads: int):
    sess = _session(path, threads)
    return "onnxruntime", lambda xs: sess.run(None, _feed(sess, xs))


OVERHEAD_OPS = {"Pad": "pad", "QuantizeLinear": "convert", "DequantizeLinear": "convert", "Cast": "convert",
                "Transpose": "transpose", "ReorderInput": "transpose", "ReorderOutput": "transpose"}


def profile(path: str, inputs, threads: int, runs: int, folder: str) -> list[dict]:
    """Per-node times from ONNX Runtime's own profiler (``enable_profiling``): each node's median over ``runs``
    runs, from the "Node" events of its JSON trace (durations in microseconds)."""
    import json
    import os

    sess = _session(path, threads, os.path.join(folder, "ort-profile"))
    feed = _feed(sess, inputs)
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
