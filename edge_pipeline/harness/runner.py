#!/usr/bin/env python3
"""The on-device runner: loads one artifact, runs inputs from an .npz, times it, writes a JSON result.

Standalone on purpose: it is copied to boards and phones with the ``runtime_<name>.py`` modules beside it,
so it imports only numpy and the runtime the artifact needs (the runtime module for the artifact's suffix says
which), never the rest of edge_pipeline.

    python runner.py MODEL INPUTS.npz OUT.json [--threads N] [--runs N] [--warmup N] [--outputs OUT.npz] [--pin]
                     [--profile]

INPUTS.npz holds ``input_0``, ``input_1``, ... (or ``x`` alone): one inference per row. Latency is timed on
row 0; every row is run once for the outputs (``output_0``, ...) that accuracy is computed from on the host.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time

import numpy as np

UNSTABLE_CV = 0.15  # coefficient of variation above which a latency figure is flagged unstable


@functools.lru_cache(maxsize=None)  # noqa: UP033 - functools.cache is 3.9+; boards may run older Pythons
def runtimes() -> dict[str, object]:
    """{artifact suffix: its runtime module}: every ``runtime_<name>.py`` beside this file. Imported as
    ``edge_pipeline.harness.runtime_<name>`` on the host, as plain ``runtime_<name>`` where this file runs as
    a script (its folder is then first on sys.path)."""
    import importlib

    here = os.path.dirname(os.path.abspath(__file__))
    found = {}
    for f in sorted(os.listdir(here)):
        if f.startswith("runtime_") and f.endswith(".py"):
            name = f"{__package__}.{f[:-3]}" if __package__ else f[:-3]
            mod = importlib.import_module(name)
            found.update({suffix: mod for suffix in mod.SUFFIXES})
    return found


def runtime_for(path: str):
    ext = os.path.splitext(path)[1]
    known = runtimes()
    if ext not in known:
        raise SystemExit(f"runner: unknown artifact type '{ext}' ({path}); known: {', '.join(sorted(known))}")
    return known[ext]


def artifact_bytes(path: str) -> int:
    """The artifact's size with the files beside it that are part of it (OpenVINO's weights .bin)."""
    stem = os.path.splitext(path)[0]
    return os.path.getsize(path) + sum(os.path.getsize(stem + s) for s in runtime_for(path).SIDECARS)


class Model:
    """One loaded artifact with a uniform ``run(inputs) -> outputs``: lists of arrays, batch 1, in the order of
    the model interface. Each runtime module casts inputs to the artifact's own dtypes (LiteRT takes int64 token
    ids as int32; float inputs of an int8-I/O model are quantized with that tensor's own scale and zero point)."""

    def __init__(self, path: str, threads: int):
        self.path, self.threads = path, threads
        self.runtime_name, self._run = runtime_for(path).open_model(path, threads)
        self.runtime_version = _pkg_version(self.runtime_name)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # C-order copies with standard strides (a size-1 axis of a view can carry odd strides).
        return list(self._run([np.array(x, order="C", copy=True) for x in inputs]))


def load_inputs(path: str) -> list[np.ndarray]:
    """``input_0``, ``input_1``, ... from an .npz (``x`` alone is one input)."""
    with np.load(path, allow_pickle=False) as z:
        if "x" in z.files:
            return [z["x"]]
        keys = sorted((k for k in z.files if k.startswith("input_")), key=lambda k: int(k.split("_")[1]))
        return [z[k] for k in keys]


def save_npz(path, arrays: dict) -> None:
    """An .npz that np.load reads, byte-identical for identical arrays: np.savez stamps each entry with the
    current time, which would make every bundle differ."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def save_inputs(path, inputs: list[np.ndarray]) -> None:
    save_npz(path, {f"input_{i}": x for i, x in enumerate(inputs)})


def save_outputs(path, outputs: list[np.ndarray]) -> None:
    save_npz(path, {f"output_{i}": y for i, y in enumerate(outputs)})


def load_outputs(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        keys = sorted((k for k in z.files if k.startswith("output_")), key=lambda k: int(k.split("_")[1]))
        return [z[k] for k in keys]


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


def _rss_bytes() -> int | None:
    """Resident set of this process now (VmRSS), or None where /proc is not there."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


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
            "cpu_freq_khz": _read(cpu + "scaling_cur_freq"), "hostname": platform.node(),
            # Set by an emulated board's python (scripts/arm-board.sh): its kernels are real, its clock is not.
            "emulated": os.environ.get("EDGE_PIPELINE_EMULATED") or None}


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


class RuntimeMissing(Exception):
    """The artifact's runtime cannot be imported on this device."""


def _import_runtime(path: str) -> None:
    """Import the runtime before the clock starts: init time measures loading the model, not Python imports."""
    try:
        runtime_for(path).load()
    except (ImportError, OSError) as e:  # not installed, or a native library it needs is missing
        raise RuntimeMissing(f"runtime not available on this board ({platform.machine()}): "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def pin_to_one_core() -> None:
    """Keep a 1-thread run on one core (the last it may use: on phones the big cores are numbered last).
    Unpinned, the scheduler's occasional migrations show up as outliers that move a p50 at microsecond scale."""
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass  # no affinity API here (macOS): run unpinned; conditions.cpu_affinity says so


def model_memory(before: int | None, loaded: int | None, ran: int | None) -> dict:
    """The model's own memory: resident set after loading it and after the timed runs, less the resident set
    before loading (Python, numpy, the runtime's library and the inputs already in). The process's peak
    (peak_rss_bytes) is mostly the harness: hundreds of MB for the torch import ExecuTorch's Python API needs."""
    if before is None or loaded is None or ran is None:
        return {"model_bytes": None, "source": "not measured: no /proc/self/status here"}
    return {"model_bytes": max(loaded, ran) - before, "after_load_bytes": loaded - before,
            "source": "runner: resident set after load and runs minus before load"}


def measure(model_path: str, x: list[np.ndarray], threads: int = 1, runs: int = 50,
            warmup: int = 5, pin: bool = False, profile: bool = False) -> tuple[dict, list[np.ndarray]]:
    if pin and threads == 1:
        pin_to_one_core()
    _import_runtime(model_path)
    rss_before = _rss_bytes()  # runtime imported and inputs loaded: what follows is the model's
    t0 = time.perf_counter()
    model = Model(model_path, threads)
    init_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded = _rss_bytes()
    row = [a[:1] for a in x]
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
    rss_ran = _rss_bytes()
    per_row = [model.run([a[i:i + 1] for a in x]) for i in range(len(x[0]))]
    outputs = [np.concatenate([r[k] for r in per_row]) for k in range(len(per_row[0]))]
    result = {"artifact": os.path.basename(model_path), "size_bytes": artifact_bytes(model_path),
              "runtime": model.runtime_name, "runtime_version": model.runtime_version,
              "init_ms": init_ms, "first_inference_ms": first_ms, "latency": latency_stats(times),
              "memory": model_memory(rss_before, rss_loaded, rss_ran), "peak_rss_bytes": _peak_rss_bytes(),
              "conditions": conditions(threads), "samples": len(x[0])}
    if profile:
        result["profile"] = op_profile(model_path, row, threads)
    return result, outputs


PROFILE_RUNS = 10


def op_profile(model_path: str, row: list[np.ndarray], threads: int, runs: int = PROFILE_RUNS) -> dict:
    """The runtime's own per-operator profile of one row (``ops``: name, kind, median ms, overhead class), in a
    fresh load of the model after the timed runs; or ``unavailable`` with the reason."""
    import tempfile

    mod = runtime_for(model_path)
    if not hasattr(mod, "profile"):
        return {"unavailable": f"no per-operator profile for {os.path.splitext(model_path)[1]} files on this device "
                               f"kind: {getattr(mod, 'NO_PROFILE', 'its Python runtime has no operator profiler')}"}
    with tempfile.TemporaryDirectory() as folder:
        try:
            ops = mod.profile(model_path, row, threads, runs, folder)
        except Exception as e:  # noqa: BLE001 - a profiler that fails costs the profile, not the measurement
            return {"unavailable": f"profiler failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"ops": ops, "runs": runs}


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
    ap.add_argument("--profile", action="store_true", help="add the runtime's per-operator profile of one row")
    a = ap.parse_args(argv)
    try:
        result, outputs = measure(a.model, load_inputs(a.inputs), a.threads, a.runs, a.warmup, a.pin,
                                  a.profile)
    except RuntimeMissing as e:
        print(e, file=sys.stderr)
        return 3
    if a.outputs:
        save_outputs(a.outputs, outputs)
    with open(a.out_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
