"""Android over adb: push the runtimes' own benchmark binaries, the artifact and its golden input to
/data/local/tmp, run them with explicit threads, warm-up and runs, and parse what each tool prints.

A stock phone has no Python, so nothing of the pipeline runs there: the binaries are the user's, built for the
phone's ABI, named in the device spec by their path on this machine (pushed once per device) or on the phone:
``adb://SERIAL?executor_runner=PATH&onnxruntime_perf_test=PATH&benchmark_model=PATH``.

What each tool gives (parsed into the runner's result schema):
- ``executor_runner`` (ExecuTorch, built with bundled IO): load time, each execution's time, the memory-planned
  buffers, and the bundled program's own check of the outputs against those recorded at lowering; with
  ``--output_file`` it writes the outputs, pulled back and compared here with the host runtime's.
- ``onnxruntime_perf_test``: session creation time, P50/P90/P99 and mean, the process's peak working set. It
  reads the golden inputs from ``test_data_set_0/`` beside the model.
- ``benchmark_model`` (LiteRT): init time, mean/std/min/max of N runs, the memory footprint delta from the
  tool's start. It prints no percentiles: the p50 is the median of ``ROUNDS`` invocations' means (said so in
  ``latency.p50_basis``).
None of them runs the whole evaluation split, so accuracy on an adb device is the golden-input check, not a
full evaluation (the result says so).
"""

from __future__ import annotations

import re
import shlex
import statistics
import tempfile
from pathlib import Path

import numpy as np

from edge_pipeline.devices import DeviceError, DeviceSpec, run_tool

REMOTE_ROOT = "/data/local/tmp/edge-pipeline"
ROUNDS = 5  # invocations of a tool that prints only a mean, for a p50 of means
NUM = r"([-+]?[\d.]+(?:[eE][-+]?\d+)?)"


def _latency(times_ms: list[float] | None = None, **given) -> dict:
    """The runner's latency schema (its own ``latency_stats`` and instability threshold) from per-run times
    where a tool prints them, else from the tool's summary."""
    from edge_pipeline.devices.runner import load_runner

    runner = load_runner()
    lat = dict(given)
    if times_ms:
        lat.update(runner.latency_stats(times_ms), max_ms=float(max(times_ms)),
                   p50_basis="per-run times the tool printed")
    elif lat.get("std_ms") is not None and lat.get("mean_ms"):
        lat["cv"] = lat["std_ms"] / lat["mean_ms"]
        lat["unstable"] = lat["cv"] > runner.UNSTABLE_CV
    return lat


def parse_benchmark_model(text: str) -> dict:
    """LiteRT ``benchmark_model``: init, first inference, the timed runs' count/min/max/avg/std (us), and the
    memory footprint delta from the tool's start (MB)."""
    m = re.search(r"Inference timings in us: Init: ([\d.]+), First inference: ([\d.]+), "
                  r"Warmup \(avg\): ([\d.]+), Inference \(avg\): ([\d.]+)", text)
    if not m:
        raise ValueError("no 'Inference timings in us' line in benchmark_model output")
    init, first, _warm, avg = (float(g) for g in m.groups())
    given = {"mean_ms": avg / 1e3}
    runs = re.findall(r"count=(\d+) first=\d+ curr=\d+ min=(\d+) max=(\d+) avg=([\d.]+) std=(\d+)"
                      r"(?: p5=\d+ median=(\d+) p95=\d+)?", text)
    if runs:  # the last block is the timed runs (the first is the warm-up)
        count, mn, mx, _avg, std, median = runs[-1]
        given.update(runs=int(count), min_ms=int(mn) / 1e3, max_ms=int(mx) / 1e3, std_ms=int(std) / 1e3)
        if median:
            given.update(p50_ms=int(median) / 1e3, p50_basis="median the tool printed")
    out = {"init_ms": init / 1e3, "first_inference_ms": first / 1e3, "latency": _latency(**given)}
    mem = re.search(r"(?:Peak memory footprint|Memory footprint delta from the start of the tool) \(MB\): "
                    r"init=([\d.]+) overall=([\d.]+)", text)
    out["memory"] = ({"model_bytes": int(float(mem.group(2)) * 2 ** 20),
                      "source": "benchmark_model: memory footprint delta from the tool's start (overall)"}
                     if mem else {"model_bytes": None, "source": "benchmark_model printed no memory figure"})
    return out


def parse_onnxruntime_perf_test(text: str) -> dict:
    """``onnxruntime_perf_test -m times``: session creation (s), mean (ms), min/max/percentiles (s), peak
    working set (bytes)."""
    avg = re.search(r"Average inference time cost:\s*" + NUM + r"\s*ms", text)
    if not avg:
        raise ValueError("no 'Average inference time cost' line in onnxruntime_perf_test output")
    given: dict = {"mean_ms": float(avg.group(1))}
    if m := re.search(r"Total inference requests:\s*(\d+)", text):
        given["runs"] = int(m.group(1))
    for key, label in (("min_ms", "Min"), ("max_ms", "Max"), ("p50_ms", "P50"), ("p90_ms", "P90"),
                       ("p99_ms", "P99")):
        if m := re.search(label + r" Latency(?: is|:)\s*" + NUM + r"\s*(?:sec|s)\b", text):
            given[key] = float(m.group(1)) * 1e3
    if "p50_ms" in given:
        given["p50_basis"] = "P50 the tool printed"
    out: dict = {"latency": _latency(**given)}
    if m := re.search(r"Session creation time cost:\s*" + NUM + r"\s*s", text):
        out["init_ms"] = float(m.group(1)) * 1e3
    m = re.search(r"Peak working set size:\s*(\d+)\s*bytes", text)
    out["memory"] = ({"model_bytes": int(m.group(1)),
                      "source": "onnxruntime_perf_test: peak working set of the tool's process"}
                     if m else {"model_bytes": None, "source": "onnxruntime_perf_test printed no memory figure"})
    return out


def parse_executor_runner(text: str) -> dict:
    """ExecuTorch ``executor_runner``: load time, each execution's time ("Iteration i of N: t ms"; older builds
    print only the total), the memory-planned buffers, and the bundled-IO verdict with its error stats."""
    m = re.search(r"Model executed successfully (\d+) time\(s\) in " + NUM + " ms", text)
    if not m:
        raise ValueError("no 'Model executed successfully' line in executor_runner output")
    n, total = int(m.group(1)), float(m.group(2))
    times = [float(t) for t in re.findall(r"Iteration \d+ of \d+: " + NUM + " ms", text)]
    out: dict = {"latency": _latency(times) if times else _latency(mean_ms=total / n, runs=n)}
    if load := re.search(r"Model loaded in " + NUM + " ms", text):
        out["init_ms"] = float(load.group(1))
    planned = [int(b) for b in re.findall(r"Setting up (?:CPU )?planned buffer \d+, size (\d+)", text)]
    out["memory"] = ({"planned_bytes": sum(planned), "model_bytes": None,
                      "source": "executor_runner: memory-planned buffers (activations) from its log"}
                     if planned else {"model_bytes": None, "source": "executor_runner printed no memory figure"})
    if "Test_result: PASS" in text:
        out["bundled_io"] = {"ok": True}
    elif "Test_result: FAIL" in text or "Bundle verification failed" in text:
        out["bundled_io"] = {"ok": False}
    if "bundled_io" in out:
        for key in ("max_absolute_error", "mean_absolute_error", "max_relative_error"):
            if e := re.search(key + r":\s*" + NUM, text):
                out["bundled_io"][key] = float(e.group(1))
    return out


PARSERS = {"tflite": parse_benchmark_model, "onnxruntime": parse_onnxruntime_perf_test,
           "executorch": parse_executor_runner}
TOOLS = {"tflite": "benchmark_model", "onnxruntime": "onnxruntime_perf_test", "executorch": "executor_runner"}


def median_of_rounds(rounds: list[dict]) -> dict:
    """One result from several invocations of a tool that prints only a mean: p50 is the median of the means."""
    out = dict(rounds[0])
    means = [r["latency"]["mean_ms"] for r in rounds]
    out["latency"] = {**rounds[0]["latency"], "p50_ms": statistics.median(means), "mean_ms": statistics.fmean(means),
                      "runs": sum(r["latency"].get("runs", 0) for r in rounds), "round_means_ms": means,
                      "p50_basis": f"median of {len(rounds)} invocations' means (the tool prints no percentiles)"}
    return out


class ADBDevice:
    def __init__(self, spec: DeviceSpec, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.adb = ["adb", "-s", spec.serial or ""]
        self.workdir = REMOTE_ROOT
        self.tools: dict[str, str] = {}  # tool name -> its path on the phone (pushed once)
        code, out, err = self._call([*self.adb, "get-state"], "connect")
        if code != 0 or "device" not in out:
            raise DeviceError(spec.spec, "connect", err or out or "adb get-state failed",
                              hint="check `adb devices` lists the serial and the phone is authorised")
        self._shell(["rm", "-rf", REMOTE_ROOT], "cleanup")
        self._shell(["mkdir", "-p", REMOTE_ROOT], "mkdir")

    def _call(self, argv: list[str], step: str) -> tuple[int, str, str]:
        res = run_tool(argv, self.timeout, self.spec.spec, step,
                       dropped=lambda r: "device offline" in r.stderr or "no devices" in r.stderr,
                       missing_hint="install Android platform tools (Debian: adb)")
        return res.returncode, res.stdout, res.stderr

    def _shell(self, argv: list[str], step: str) -> tuple[int, str, str]:
        # adb shell joins its arguments into one command line for the phone's shell: quote each one.
        return self._call([*self.adb, "shell", " ".join(shlex.quote(a) for a in argv)], step)

    def push(self, files: list[Path], dest: str = REMOTE_ROOT) -> None:
        for f in files:
            code, _, err = self._call([*self.adb, "push", str(f), f"{dest}/{Path(f).name}"], "push")
            if code != 0:
                raise DeviceError(self.spec.spec, "push", err)

    def path(self, name: str) -> str:
        return f"{REMOTE_ROOT}/{name}"

    def run(self, argv: list[str], step: str, cwd: str = REMOTE_ROOT) -> tuple[int, str, str]:
        remote = "cd " + shlex.quote(cwd) + " && " + " ".join(shlex.quote(a) for a in argv)
        return self._call([*self.adb, "shell", remote], step)

    def pull(self, name: str, dest: Path) -> None:
        code, _, err = self._call([*self.adb, "pull", f"{REMOTE_ROOT}/{name}", str(dest)], "pull")
        if code != 0:
            raise DeviceError(self.spec.spec, "pull", err)

    def tool(self, backend: str) -> str:
        """The benchmark binary for this backend on the phone: pushed from this machine the first time it is
        needed (a path that is not a file here is taken as a path on the phone)."""
        name = TOOLS[backend]
        if name in self.tools:
            return self.tools[name]
        given = self.spec.options.get(name)
        if not given:
            raise DeviceError(self.spec.spec, f"benchmark {backend}", f"no {name} binary given",
                              hint=f"add ?{name}=PATH (built for the phone's ABI) to the device spec")
        if Path(given).is_file():
            self.push([Path(given)])
            given = self.path(Path(given).name)
            self._shell(["chmod", "755", given], "chmod")
        self.tools[name] = given
        return given

    def benchmark(self, backend: str, target_dir: Path, threads: int, runs: int, warmup: int) -> tuple[dict, list]:
        """The runtime's own benchmark binary on the artifact and its golden input; its output parsed into the
        runner's result schema, plus the outputs the tool wrote, where it writes them."""
        tool = self.tool(backend)
        folder = f"{REMOTE_ROOT}/{target_dir.name}"
        self._shell(["mkdir", "-p", folder], "mkdir")
        outputs: list = []
        if backend == "executorch":
            self.push([target_dir / "model.bpte"], folder)
            argv = [tool, "--model_path=model.bpte", f"--num_executions={runs}", f"--cpu_threads={threads}",
                    "--output_file=output", "--print_output=none"]
        elif backend == "onnxruntime":
            self.push([target_dir / "model.ort", target_dir / "test_data_set_0"], folder)
            argv = [tool, "-m", "times", "-r", str(runs), "-x", str(threads), "-e", "cpu", "model.ort"]
        else:
            from edge_pipeline.backends.tflite import describe

            specs = describe(target_dir / "model.tflite")["inputs"]
            raws = [target_dir / f"input_{i}.raw" for i in range(len(specs))]
            self.push([target_dir / "model.tflite", *raws], folder)
            names = [s.get("tensor", s["name"]) for s in specs]  # the file's own input tensor names
            files = ",".join(f"{n.replace(':', '::')}:{r.name}" for n, r in zip(names, raws, strict=True))
            argv = [tool, "--graph=model.tflite", f"--num_threads={threads}", f"--num_runs={runs}",
                    f"--warmup_runs={warmup}", "--input_layer=" + ",".join(names), "--input_layer_value_files=" + files]
        results = [self._invoke(backend, folder, argv)]
        if results[0]["latency"].get("p50_ms") is None:  # a mean only: more invocations, for a median of means
            results += [self._invoke(backend, folder, argv) for _ in range(ROUNDS - 1)]
        result = results[0] if len(results) == 1 else median_of_rounds(results)
        if backend == "executorch":
            outputs = self._pull_outputs(folder, target_dir)
        result.update(artifact=target_dir.name, runtime=TOOLS[backend], runtime_version=None, tool=tool,
                      command=" ".join(argv))
        return result, outputs

    def _invoke(self, backend: str, folder: str, argv: list[str]) -> dict:
        code, out, err = self.run(argv, f"benchmark {backend}", cwd=folder)
        text = out + "\n" + err
        if code != 0 and "Test_result: FAIL" not in text:  # a failed bundled check is a result, not an error
            raise DeviceError(self.spec.spec, f"benchmark {backend}", text[-800:])
        try:
            return PARSERS[backend](text)
        except ValueError as e:
            raise DeviceError(self.spec.spec, f"parse {TOOLS[backend]} output", f"{e}: {text[-400:]}") from None

    def _pull_outputs(self, folder: str, target_dir: Path) -> list[np.ndarray]:
        """executor_runner's --output_file tensors (raw bytes, one file per output), in the .pte's own dtypes
        and shapes as the lower stage described them."""
        import json

        described = json.loads((target_dir / "describe.json").read_text())
        outs = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, spec in enumerate(described.get("outputs", [])):
                local = Path(tmp) / f"output-{i}.bin"
                code, _, err = self._call([*self.adb, "pull", f"{folder}/output-{i}.bin", str(local)], "pull")
                if code != 0:
                    raise DeviceError(self.spec.spec, "pull", err)
                # describe.json's shapes leave out the batch dimension: the golden input is one row
                outs.append(np.fromfile(local, dtype=spec.get("dtype", "float32")).reshape([1, *spec["shape"]]))
        return outs

    def info(self) -> dict:
        _, out, _ = self._shell(["getprop", "ro.product.model"], "info")
        _, abi, _ = self._shell(["getprop", "ro.product.cpu.abi"], "info")
        return {"device": self.spec.spec, "model": out.strip(), "abi": abi.strip()}

    def close(self) -> None:
        self._shell(["rm", "-rf", REMOTE_ROOT], "cleanup")
