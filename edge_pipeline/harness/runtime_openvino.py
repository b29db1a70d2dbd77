"""OpenVINO's CPU plugin for IR files (.xml, its weights in the .bin beside it)."""

from __future__ import annotations

SUFFIXES = (".xml",)
SIDECARS = (".bin",)


def load() -> None:
    import openvino  # noqa: F401


def _compile(path: str, threads: int, **extra):
    """The CPU plugin on ``threads`` threads, one stream, for latency. f32 inference precision: on CPUs with bf16
    or AMX the plugin would otherwise run an fp32 model in bf16."""
    import openvino as ov

    return ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 **extra})


def open_model(path: str, threads: int):
    import numpy as np

    compiled = _compile(path, threads)
    request = compiled.create_infer_request()
    dtypes = [np.dtype(i.get_element_type().to_dtype()) for i in compiled.inputs]

    def run(xs):
        result = request.infer([x if x.dtype == d else x.astype(d) for x, d in zip(xs, dtypes)])  # noqa: B905
        return [np.array(result[o]) for o in compiled.outputs]

    return "openvino", run


OVERHEAD_OPS = {"Pad": "pad", "Convert": "convert", "FakeQuantize": "convert", "Reorder": "transpose",
                "Transpose": "transpose"}


def profile(path: str, inputs, threads: int, runs: int, folder: str) -> list[dict]:
    """Per-node times from OpenVINO's CPU plugin (``PERF_COUNT``): each executed node's median over ``runs``
    inferences, its kind the plugin's node type (with the kernel it ran, e.g. ``jit_avx2_I8``)."""

    compiled = _compile(path, threads, PERF_COUNT=True)
    request = compiled.create_infer_request()
    times: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for _ in range(runs):
        request.infer(list(inputs))
        for p in request.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                times.setdefault(p.node_name, []).append(p.real_time.total_seconds() * 1e3)
                kinds[p.node_name] = f"{p.node_type} ({p.exec_type})"
    return [{"name": n, "kind": kinds[n], "ms": sorted(t)[len(t) // 2],
             "overhead": OVERHEAD_OPS.get(kinds[n].split(" (")[0])} for n, t in times.items()]
