"""Android over adb: push the runtimes' own benchmark binaries, the artifact and its golden input to
/data/local/tmp, run them with explicit threads, warm-up and runs, and parse what each tool prints.

A stock phone has no Python, so nothing of the pipeline runs there: the binaries are the user's, built for the
phone's ABI, named in the device spec by their path on this machine (pushed once per device) or on the phone:
``adb://SERIAL?executor_runner=PATH&onnxruntime_perf_test=PATH&benchmark_model=PATH``.

Each backend names its tool, what to push and how to read its output (``BACKEND.device_tool``). What the built-in
ones give (parsed into the runner's result schema):
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

import shlex
import statistics
import tempfile
from pathlib import Path

import numpy as np

from edge_pipeline.backends import DeviceTool, spec
from edge_pipeline.devices.base import DeviceError, DeviceSpec, run_tool

REMOTE_ROOT = "/data/local/tmp/edge-pipeline"
ROUNDS = 5  # invocations of a tool that prints only a mean, for a p50 of means


def median_of_rounds(rounds: list[dict]) -> dict:
    """One result from several invocations of a tool that prints only a mean: p50 is the median of the means."""
    out = dict(rounds[0])
    means = [r["latency"]["mean_ms"] for r in rounds]
    out["latency"] = {**rounds[0]["latency"], "p50_ms": statistics.median(means), "mean_ms": statistics.fmean(means),
                      "runs": sum(r["latency"].get("runs", 0) for r in rounds), "round_means_ms": means,
                      "p50_basis": f"median of {len(rounds)} invocations' means (the tool prints no percentiles)"}
    return out




class ADBDevice:
    runs_python = False  # a stock phone: the runtimes' own benchmark binaries, not the harness
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

    def tool(self, backend: str) -> DeviceTool:
        """The backend's benchmark binary on the phone: pushed from this machine the first time it is needed (a
        path that is not a file here is taken as a path on the phone)."""
        tool = spec(backend).device_tool
        if tool is None:
            raise DeviceError(self.spec.spec, f"benchmark {backend}", f"backend {backend} has no benchmark tool "
                              "for phones", hint="measure this target on a local or ssh device")
        if tool.name in self.tools:
            return tool
        given = self.spec.options.get(tool.name)
        if not given:
            raise DeviceError(self.spec.spec, f"benchmark {backend}", f"no {tool.name} binary given",
                              hint=f"add ?{tool.name}=PATH (built for the phone's ABI) to the device spec")
        if Path(given).is_file():
            self.push([Path(given)])
            given = self.path(Path(given).name)
            self._shell(["chmod", "755", given], "chmod")
        self.tools[tool.name] = given
        return tool

    def benchmark(self, backend: str, target_dir: Path, threads: int, runs: int, warmup: int,
                  profile: bool = False) -> tuple[dict, list]:
        """The runtime's own benchmark binary on the artifact and its golden input; its output parsed into the
        runner's result schema, plus the outputs the tool wrote, where it writes them."""
        tool = self.tool(backend)
        folder = f"{REMOTE_ROOT}/{target_dir.name}"
        self._shell(["mkdir", "-p", folder], "mkdir")
        self.push(tool.files(target_dir), folder)
        argv = tool.argv(self.tools[tool.name], target_dir, threads, runs, warmup)
        results = [self._invoke(tool, folder, argv)]
        if results[0]["latency"].get("p50_ms") is None:  # a mean only: more invocations, for a median of means
            results += [self._invoke(tool, folder, argv) for _ in range(ROUNDS - 1)]
        result = results[0] if len(results) == 1 else median_of_rounds(results)
        outputs = self._pull_outputs(folder, target_dir) if tool.writes_outputs else []
        result.update(artifact=target_dir.name, runtime=tool.name, runtime_version=None, tool=argv[0],
                      command=" ".join(argv))
        if profile:
            result["profile"] = self._profile(tool, folder, argv)
        return result, outputs

    def _profile(self, tool: DeviceTool, folder: str, argv: list[str]) -> dict:
        """The tool's own per-operator profile, in an invocation of its own (profiling slows the timed runs)."""
        if tool.parse_profile is None:
            return {"unavailable": f"no per-operator profile from {tool.name} on this device kind"}
        code, out, err = self.run([*argv, *tool.profile_flags], f"profile with {tool.name}", cwd=folder)
        try:
            ops = tool.parse_profile(out + "\n" + err)
        except ValueError as e:
            return {"unavailable": f"{tool.name} gave no profile (exit {code}): {e}"}
        return {"ops": ops, "source": f"{tool.name} {' '.join(tool.profile_flags)}"}

    def _invoke(self, tool: DeviceTool, folder: str, argv: list[str]) -> dict:
        code, out, err = self.run(argv, f"run {tool.name}", cwd=folder)
        text = out + "\n" + err
        if code != 0 and "Test_result: FAIL" not in text:  # a failed bundled check is a result, not an error
            raise DeviceError(self.spec.spec, f"run {tool.name}", text[-800:])
        try:
            return tool.parse(text)
        except ValueError as e:
            raise DeviceError(self.spec.spec, f"parse {tool.name} output", f"{e}: {text[-400:]}") from None

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
