#!/usr/bin/env python3
"""The on-device runner: loads one artifact, runs inputs from an .npz, times it, writes a JSON result.

Standalone on purpose: it is copied to boards and phones, so it imports only numpy and the runtime the
artifact needs (``executorch.runtime`` for .pte, ``onnxruntime`` for .onnx/.ort, ``ai_edge_litert`` or else
``tflite_runtime`` for .tflite), never edge_pipeline. ExecuTorch's Python runtime takes torch tensors, so
torch is imported for .pte only.

    python runner.py MODEL INPUTS.npz OUT.json [--threads N] [--runs N] [--warmup N] [--outputs OUT.npz] [--pin]

INPUTS.npz holds ``x`` (a batch: one inference per row). Latency is timed on row 0; every row is run once
for the outputs that accuracy is computed from on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

UNSTABLE_CV = 0.15  # coefficient of variation above which a latency figure is flagged unstable


class Model:
    """One loaded artifact with a uniform ``run(x) -> logits`` for a single float32 input row (batch 1)."""

    def __init__(self, path: str, threads: int):
        self.path, self.threads = path, threads
        ext = os.path.splitext(path)[1]
        if ext == ".pte":
            self._open_executorch()
        elif ext in (".onnx", ".ort"):
            self._open_onnxruntime()
        elif ext == ".tflite":
            self._open_tflite()
        else:
            raise SystemExit(f"runner: unknown artifact type '{ext}' ({path})")

    def _open_executorch(self):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(self.threads)
        self.runtime_name, self.runtime_version = "executorch", _pkg_version("executorch")
        self._method = Runtime.get().load_program(self.path).load_method("forward")
        self._run = lambda x: self._method.execute([torch.from_numpy(x)])[0].numpy()

    def _open_onnxruntime(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        self.runtime_name, self.runtime_version = "onnxruntime", ort.__version__
        sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        self._run = lambda x: sess.run(None, {name: x})[0]

    def _open_tflite(self):
        try:
            from ai_edge_litert.interpreter import Interpreter
            self.runtime_name, self.runtime_version = "ai-edge-litert", _pkg_version("ai-edge-litert")
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
            self.runtime_name, self.runtime_version = "tflite-runtime", _pkg_version("tflite-runtime")
        it = Interpreter(model_path=self.path, num_threads=self.threads)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]

        def run(x):
            if inp["dtype"] == np.int8:  # int8 I/O: quantize with the model's own scale and zero point
                scale, zp = inp["quantization"]
                x = np.clip(np.round(x / scale + zp), -128, 127).astype(np.int8)
            it.set_tensor(inp["index"], np.ascontiguousarray(x))
            it.invoke()
            y = it.get_tensor(out["index"])
            if out["dtype"] == np.int8:
                scale, zp = out["quantization"]
                y = (y.astype(np.float32) - zp) * scale
            return y.copy()

        self._run = run

    def run(self, x: np.ndarray) -> np.ndarray:
        # A C-order copy with standard strides (a size-1 axis of a view can carry odd strides).
        return self._run(np.array(x, dtype=np.float32, order="C", copy=True))


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _peak_rss_bytes() -> int:
    """Peak resident set of this process. VmHWM first: ru_maxrss survives fork+exec, so a runner started
    from a big parent process (the pipeline, with torch loaded) would report the parent's peak."""
    status = _read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def conditions(threads: int) -> dict:
    """What the numbers depend on: machine, OS, cores, threads, affinity and CPU frequency policy."""
    cpu = "/sys/devices/system/cpu/cpu0/cpufreq/"
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"arch": platform.machine(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "cores": os.cpu_count(), "threads": threads,
            "cpu_affinity": affinity, "cpu_governor": _read(cpu + "scaling_governor"),
            "cpu_freq_khz": _read(cpu + "scaling_cur_freq"), "hostname": platform.node()}


def latency_stats(times_ms: list[float]) -> dict:
    t = np.sort(np.asarray(times_ms))
    k = len(t) // 10
    trimmed = t[k:len(t) - k] if len(t) > 2 * k and k else t
    mean = float(t.mean())
    cv = float(t.std() / mean) if mean > 0 else 0.0
    return {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": mean, "std_ms": float(t.std()),
            "min_ms": float(t[0]), "trimmed_mean_ms": float(trimmed.mean()), "cv": cv,
            "unstable": cv > UNSTABLE_CV, "runs": len(t)}


RUNTIME_MODULES = {".pte": ("torch", "executorch.runtime"), ".onnx": ("onnxruntime",), ".ort": ("onnxruntime",)}


def _import_runtime(path: str) -> None:
    """Import the runtime before the clock starts: init time measures loading the model, not Python imports."""
    import importlib

    ext = os.path.splitext(path)[1]
    for name in RUNTIME_MODULES.get(ext, ()):
        importlib.import_module(name)
    if ext == ".tflite":
        try:
            importlib.import_module("ai_edge_litert.interpreter")
        except ImportError:
            importlib.import_module("tflite_runtime.interpreter")


def pin_to_one_core() -> None:
    """Keep a 1-thread run on one core (the last it may use: on phones the big cores are numbered last).
    Unpinned, the scheduler's occasional migrations show up as outliers that move a p50 at microsecond scale."""
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass  # no affinity API here (macOS): run unpinned; conditions.cpu_affinity says so


def measure(model_path: str, x: np.ndarray, threads: int = 1, runs: int = 50,
            warmup: int = 5, pin: bool = False) -> tuple[dict, np.ndarray]:
    if pin and threads == 1:
        pin_to_one_core()
    _import_runtime(model_path)
    t0 = time.perf_counter()
    model = Model(model_path, threads)
    init_ms = (time.perf_counter() - t0) * 1e3
    row = x[:1]
    t0 = time.perf_counter()
    model.run(row)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        model.run(row)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(row)
        times.append((time.perf_counter() - t0) * 1e3)
    outputs = np.concatenate([model.run(x[i:i + 1]) for i in range(len(x))])
    result = {"artifact": os.path.basename(model_path), "size_bytes": os.path.getsize(model_path),
              "runtime": model.runtime_name, "runtime_version": model.runtime_version,
              "init_ms": init_ms, "first_inference_ms": first_ms, "latency": latency_stats(times),
              "peak_rss_bytes": _peak_rss_bytes(), "conditions": conditions(threads), "samples": len(x)}
    return result, outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("inputs")
    ap.add_argument("out_json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--outputs", help="write the outputs of every input row to this .npz")
    ap.add_argument("--pin", action="store_true", help="with --threads 1: pin the process to one core")
    a = ap.parse_args(argv)
    with np.load(a.inputs, allow_pickle=False) as z:
        x = z["x"].astype(np.float32)
    result, outputs = measure(a.model, x, a.threads, a.runs, a.warmup, a.pin)
    if a.outputs:
        np.savez(a.outputs, y=outputs)
    with open(a.out_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
