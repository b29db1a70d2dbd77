"""LiteRT (``ai_edge_litert``, or else the older ``tflite_runtime``) for .tflite files. Float inputs of an
int8-I/O model are quantized with that tensor's own scale and zero point, and int8 outputs dequantized."""

from __future__ import annotations

import numpy as np

SUFFIXES = (".tflite",)
SIDECARS = ()
# No profile(): LiteRT's Python interpreter has no operator profiler (on a phone, the adb device's benchmark_model
# --enable_op_profiling gives one).
NO_PROFILE = "LiteRT's Python interpreter has no operator profiler"


def load() -> None:
    _interpreter()


def _interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"


def open_model(path: str, threads: int):
    interpreter, dist = _interpreter()
    it = interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    ins, outs = tflite_io(it)

    def run(xs):
        for d, x in zip(ins, xs):  # noqa: B905 - boards may run Python < 3.10
            if d["dtype"] in (np.int8, np.uint8) and x.dtype == np.float32:
                scale, zp = d["quantization"]
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zp), info.min, info.max)
            it.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]))
        it.invoke()
        ys = []
        for d in outs:
            y = it.get_tensor(d["index"])
            if d["dtype"] in (np.int8, np.uint8) and d["quantization"][0]:
                scale, zp = d["quantization"]
                y = (y.astype(np.float32) - zp) * scale
            ys.append(y.copy())
        return ys

    return dist, run


def _numeric_suffix(name: str) -> int:
    """``args_1`` -> 1, ``output_10`` -> 10 (a plain sort would put 10 before 2)."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def tflite_io(it) -> tuple[list[dict], list[dict]]:
    """Input and output details in the model's own order: the signature's ``args_<i>`` and ``output_<i>`` (the
    interpreter's plain lists are in tensor-index order, which need not be the model's)."""
    sigs = it.get_signature_list()
    if not sigs:
        return it.get_input_details(), it.get_output_details()
    runner = it.get_signature_runner(next(iter(sigs)))
    ins, outs = runner.get_input_details(), runner.get_output_details()
    return ([ins[k] for k in sorted(ins, key=_numeric_suffix)], [outs[k] for k in sorted(outs, key=_numeric_suffix)])

