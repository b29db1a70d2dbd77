"""OpenVINO's CPU plugin for IR files (.xml, its weights in the .bin beside it)."""

from __future__ import annotations

SUFFIXES = (".xml",)
SIDECARS = (".bin",)


def load() -> None:
    import openvino  # noqa: F401


def open_model(path: str, threads: int):
    import numpy as np
    import openvino as ov

    # f32 inference precision: on CPUs with bf16 or AMX the plugin would otherwise run an fp32 model in bf16.
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                      "INFERENCE_PRECISION_HINT": "f32",
                                                      "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    dtypes = [np.dtype(i.get_element_type().to_dtype()) for i in compiled.inputs]

    def run(xs):
        result = request.infer([x if x.dtype == d else x.astype(d) for x, d in zip(xs, dtypes)])  # noqa: B905
        return [np.array(result[o]) for o in compiled.outputs]

    return "openvino", run
