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
