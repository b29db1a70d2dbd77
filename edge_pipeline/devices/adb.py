"""Android over adb: push to /data/local/tmp and run the runtimes' own benchmark binaries.

The binaries are the user's (built for the phone's ABI) and are named in the device spec:
``adb://SERIAL?benchmark_model=/data/local/tmp/benchmark_model&onnxruntime_perf_test=...&executor_runner=...``.
Their output is parsed into the same latency/memory figures the Python runner reports. These tools run
the golden input the lower stage wrote; they do not return outputs for the whole evaluation split, so
accuracy on adb devices is the lower stage's parity check, not a full evaluation.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from edge_pipeline.devices import DeviceError, DeviceSpec, run_tool

REMOTE_ROOT = "/data/local/tmp/edge-pipeline"


def parse_benchmark_model(text: str) -> dict:
    """TFLite/LiteRT ``benchmark_model``: Init, first inference, avg/std (us) and peak memory (MB)."""
    out: dict = {}
    m = re.search(r"Inference timings in us: Init: ([\d.]+), First inference: ([\d.]+), "
                  r"Warmup \(avg\): ([\d.]+), Inference \(avg\): ([\d.]+)", text)
    if not m:
        raise ValueError("no 'Inference timings in us' line in benchmark_model output")
    init, first, _warm, avg = (float(g) for g in m.groups())
    out.update(init_ms=init / 1e3, first_inference_ms=first / 1e3)
    runs = re.findall(r"count=(\d+) first=\d+ curr=\d+ min=(\d+) max=(\d+) avg=([\d.]+) std=(\d+)", text)
    lat = {"mean_ms": avg / 1e3}
    if runs:
        count, mn, mx, _avg, std = runs[-1]
        lat.update(runs=int(count), min_ms=int(mn) / 1e3, max_ms=int(mx) / 1e3, std_ms=int(std) / 1e3)
        lat["cv"] = lat["std_ms"] / lat["mean_ms"] if lat["mean_ms"] else 0.0
    out["latency"] = lat
    mem = re.search(r"(?:Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): "
                    r"init=([\d.]+) overall=([\d.]+)", text)
    if mem:
        out["peak_memory_bytes"] = int(float(mem.group(2)) * 2 ** 20)
    return out


def parse_onnxruntime_perf_test(text: str) -> dict:
    """``onnxruntime_perf_test``: session creation, average, percentiles (s) and peak working set."""
    num = r"([\d.eE+-]+)"
    avg = re.search(r"Average inference time cost:\s*" + num + r"\s*ms", text)
    if not avg:
        raise ValueError("no 'Average inference time cost' line in onnxruntime_perf_test output")
    out: dict = {"latency": {"mean_ms": float(avg.group(1))}}
    if m := re.search(r"Session creation time cost:\s*" + num + r"\s*s", text):
        out["init_ms"] = float(m.group(1)) * 1e3
    if m := re.search(r"Total inference requests:\s*(\d+)", text):
        out["latency"]["runs"] = int(m.group(1))
    for key, label in (("min_ms", "Min"), ("max_ms", "Max"), ("p50_ms", "P50"), ("p90_ms", "P90"),
                       ("p99_ms", "P99")):
        if m := re.search(label + r" Latency(?: is|:)\s*" + num + r"\s*(?:sec|s)", text):
            out["latency"][key] = float(m.group(1)) * 1e3
    if m := re.search(r"Peak working set size:\s*(\d+)\s*bytes", text):
        out["peak_memory_bytes"] = int(m.group(1))
    return out


def parse_executor_runner(text: str) -> dict:
    """ExecuTorch ``executor_runner``: total time of N executions (ms) and the bundled-IO verdict."""
    m = re.search(r"Model executed successfully (\d+) time\(s\) in ([\d.]+) ms", text)
    if not m:
        raise ValueError("no 'Model executed successfully' line in executor_runner output")
    n, total = int(m.group(1)), float(m.group(2))
    out = {"latency": {"mean_ms": total / n, "runs": n}}
    if "Bundle verification failed" in text or "bundle verification failed" in text.lower():
        out["bundled_io_ok"] = False
    elif "verification" in text.lower():
        out["bundled_io_ok"] = True
    return out


PARSERS = {"tflite": parse_benchmark_model, "onnxruntime": parse_onnxruntime_perf_test,
           "executorch": parse_executor_runner}
TOOLS = {"tflite": "benchmark_model", "onnxruntime": "onnxruntime_perf_test", "executorch": "executor_runner"}


class ADBDevice:
    def __init__(self, spec: DeviceSpec, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.python = spec.options.get("python", "python3")
        self.adb = ["adb", "-s", spec.serial or ""]
        self.workdir = REMOTE_ROOT
        code, out, err = self._call([*self.adb, "get-state"], "connect")
        if code != 0 or "device" not in out:
            raise DeviceError(spec.spec, "connect", err or out or "adb get-state failed",
                              hint="check `adb devices` lists the serial and the phone is authorised")
        self._call([*self.adb, "shell", "mkdir", "-p", REMOTE_ROOT], "mkdir")

    def _call(self, argv: list[str], step: str) -> tuple[int, str, str]:
        res = run_tool(argv, self.timeout, self.spec.spec, step,
                       dropped=lambda r: "device offline" in r.stderr or "no devices" in r.stderr,
                       missing_hint="install Android platform tools (Debian: adb)")
        return res.returncode, res.stdout, res.stderr

    def push(self, files: list[Path]) -> None:
        for f in files:
            code, _, err = self._call([*self.adb, "push", str(f), f"{REMOTE_ROOT}/{f.name}"], "push")
            if code != 0:
                raise DeviceError(self.spec.spec, "push", err)

    def path(self, name: str) -> str:
        return f"{REMOTE_ROOT}/{name}"

    def run(self, argv: list[str], step: str) -> tuple[int, str, str]:
        remote = "cd " + shlex.quote(REMOTE_ROOT) + " && " + " ".join(shlex.quote(a) for a in argv)
        return self._call([*self.adb, "shell", remote], step)

    def pull(self, name: str, dest: Path) -> None:
        code, _, err = self._call([*self.adb, "pull", f"{REMOTE_ROOT}/{name}", str(dest)], "pull")
        if code != 0:
            raise DeviceError(self.spec.spec, "pull", err)

    def benchmark(self, backend: str, target_dir: Path, threads: int, runs: int) -> dict:
        """Run the runtime's own benchmark binary on the artifact and its golden input; parse its output."""
        tool = self.spec.options.get(TOOLS[backend])
        if not tool:
            raise DeviceError(self.spec.spec, f"benchmark {backend}", f"no {TOOLS[backend]} binary given",
                              hint=f"add ?{TOOLS[backend]}=/data/local/tmp/{TOOLS[backend]} to the device spec")
        if backend == "tflite":
            self.push([target_dir / "model.tflite", target_dir / "input_0.raw"])
            argv = [tool, "--graph=model.tflite", f"--num_threads={threads}", f"--num_runs={runs}",
                    "--input_layer_value_files=" + "serving_default_args_0:input_0.raw"]
        elif backend == "onnxruntime":
            self.push([target_dir / "model.ort"])
            argv = [tool, "-m", "times", "-r", str(runs), "-x", str(threads), "model.ort"]
        else:
            self.push([target_dir / "model.bpte"])
            argv = [tool, "--model_path=model.bpte", "--bundleio", f"--num_executions={runs}"]
        code, out, err = self.run(argv, f"benchmark {backend}")
        if code != 0:
            raise DeviceError(self.spec.spec, f"benchmark {backend}", err or out)
        try:
            return PARSERS[backend](out + "\n" + err)
        except ValueError as e:
            raise DeviceError(self.spec.spec, f"parse {TOOLS[backend]} output", f"{e}: {(out + err)[-400:]}") from None

    def info(self) -> dict:
        _, out, _ = self._call([*self.adb, "shell", "getprop", "ro.product.model"], "info")
        return {"device": self.spec.spec, "model": out.strip()}

    def close(self) -> None:
        self._call([*self.adb, "shell", "rm", "-rf", REMOTE_ROOT], "cleanup")
