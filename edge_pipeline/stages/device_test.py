"""The device-test stage: measure every lowered artifact on every device: size, latency, memory, accuracy.

The standalone runner goes to the device with the artifact and the evaluation inputs; the device returns a
JSON of timings and the outputs; accuracy and agreement with the fp32 teacher are computed here, on the host.
A device or target that fails is recorded with its error, and the others are still measured.
"""

from __future__ import annotations

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge_pipeline import harness, progress
from edge_pipeline.backends import artifact_bytes, artifact_files
from edge_pipeline.devices import open_device, parse_device
from edge_pipeline.errors import PipelineError
from edge_pipeline.evaluation import Evaluator
from edge_pipeline.harness import runner
from edge_pipeline.profiles import summarize
from edge_pipeline.stages import Stage
from edge_pipeline.targets import Profile, load_profile, platform_notes


def measure_on_device(device, artifact: Path, inputs_npz: Path, threads: int, runs: int,
                      warmup: int, pin: bool = False, harness_pushed: bool = False,
                      profile: bool = False) -> tuple[dict, list[np.ndarray]]:
    """The standalone runner on the device: the artifact (and, unless ``harness_pushed``, the runner and the
    inputs, which a device needs only once for all its targets) go over, the timings and outputs come back."""
    files = artifact_files(artifact)
    device.push(files if harness_pushed else [*harness.files(), *files, inputs_npz])
    argv = [device.python, harness.RUNNER.name, artifact.name, inputs_npz.name, "result.json",
            "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup), "--outputs", "outputs.npz",
            *(["--pin"] if pin else []), *(["--profile"] if profile else [])]
    code, out, err = device.run(argv, f"run {artifact.name}")
    if code != 0:
        raise PipelineError(f"runner exited with {code} on {artifact.name}: {(err or out).strip()[-600:]}",
                            where=f"device {device.spec.spec}", exit_code=1,
                            hint="is the runtime installed there? (edge-pipeline doctor on the device)")
    with tempfile.TemporaryDirectory() as tmp:
        device.pull("result.json", Path(tmp) / "result.json")
        device.pull("outputs.npz", Path(tmp) / "outputs.npz")
        result = json.loads((Path(tmp) / "result.json").read_text())
        outputs = runner.load_outputs(str(Path(tmp) / "outputs.npz"))
    if result.get("profile", {}).get("ops"):
        result["profile"]["summary"] = summarize(result["profile"]["ops"])
    return result, outputs


def measure_with_tool(device, profile: Profile, artifact: Path, ev: Evaluator, threads: int, runs: int,
                      warmup: int, op_profile: bool = False) -> dict:
    """A phone over adb: the runtime's own benchmark binary on the golden input. The outputs the tool writes
    (ExecuTorch's) are compared with this machine's run of the same artifact on the same input."""
    from edge_pipeline.evaluation import agreement, run_artifact
    from edge_pipeline.sources.data import ArraySplit

    m, outputs = device.benchmark(profile.backend, artifact.parent, threads, runs, warmup, op_profile)
    if m.get("profile", {}).get("ops"):
        m["profile"]["summary"] = summarize(m["profile"]["ops"])
    m["size_bytes"] = artifact_bytes(artifact)
    m["accuracy"] = ("golden input only: the runtime's own tool runs one input, not the evaluation split "
                     "(the split's accuracy is the lower stage's, on this machine's runtime)")
    if outputs:
        host = run_artifact(artifact, ArraySplit(ev.data.test.rows(np.arange(1)), None), threads)
        m["golden_parity"] = agreement(outputs, host, ev.names)["worst"]
    return m


def write_inputs(path: Path, split) -> None:
    """The split's inputs as the runner reads them (``input_0``, ``input_1``, ...)."""
    runner.save_inputs(path, split.rows(np.arange(len(split))))


def tool_failures(m: dict, profile: Profile) -> list[str]:
    """What a benchmark tool's own checks say: ExecuTorch's bundled program compares the device's outputs with
    those recorded at lowering; the pulled outputs are held to the profile's parity cosine."""
    out = []
    if (m.get("bundled_io") or {}).get("ok") is False:
        out.append(f"bundled-IO check failed on the device: {m['bundled_io']}")
    parity = m.get("golden_parity")
    if parity and parity["cosine"] < profile.budgets.parity.min_cosine:
        out.append(f"golden-input outputs differ from this machine's run: cosine {parity['cosine']:.5f} < "
                   f"{profile.budgets.parity.min_cosine}")
    return out


def check_budgets(profile: Profile, m: dict) -> list[str]:
    return profile.budgets.violations(size_bytes=m["size_bytes"], accuracy_drop=m.get("metric_drop"),
                                      p50_ms=m["latency"]["p50_ms"])


def measure_targets(lower_dir: Path, lower_metrics: dict, profiles: list[Profile], devices: list[str], ev: Evaluator,
                 threads: int | None, runs: int, warmup: int, timeout: float, profile: bool = False) -> dict:
    """Every target x device; returns {"results": {target: {device: metrics}}, "failed_targets": [...],
    "unreachable_devices": {device: why}}. The test split's outputs come back from the device and are scored here
    with the recipe's metric. A device that cannot be reached fails no target's budget: it is reported as such."""
    results: dict[str, dict] = {}
    failed: set[str] = set()
    unreachable: dict[str, str] = {}
    float_metric = lower_metrics.get("float", {}).get("test_metric")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "eval_inputs.npz"
        write_inputs(inputs, ev.data.test)
        with progress.task("device tests", total=len(profiles) * len(devices)) as task:

            lock = threading.Lock()

            def record(target: str, device_spec: str, m: dict) -> None:
                with lock:
                    results.setdefault(target, {})[device_spec] = m
                    if ("error" in m or m.get("failures")) and not m.get("unreachable"):
                        failed.add(target)
                    task.advance()

            def test_device(dev_spec: str) -> None:
                try:
                    device = open_device(parse_device(dev_spec), timeout)
                except PipelineError as e:
                    unreachable[dev_spec] = str(e)
                    for p in profiles:
                        record(p.name, dev_spec, {"error": str(e), "unreachable": True})
                    return
                try:
                    uses_tools = not device.runs_python
                    if uses_tools:
                        abi = device.info().get("abi")
                    else:
                        device.push([*harness.files(), inputs])  # once per device, for all its targets
                    for p in profiles:
                        task.advance(0, f"{p.name} on {dev_spec}")
                        tm = lower_metrics["targets"].get(p.name, {})
                        if "artifact" not in tm:
                            record(p.name, dev_spec, {"error": "not lowered"})
                            continue
                        artifact = lower_dir / tm["artifact"]
                        try:
                            if uses_tools:
                                m = measure_with_tool(device, p, artifact, ev, threads or p.threads, runs, warmup,
                                                      profile)
                                m["conditions"] = {"arch": abi, "threads": threads or p.threads}
                                m["failures"] = check_budgets(p, m) + tool_failures(m, p)
                            else:
                                m, outputs = measure_on_device(device, artifact, inputs, threads or p.threads, runs,
                                                               warmup, harness_pushed=True, profile=profile)
                                m.update(ev.figures(outputs, "test"))
                                m["metric_drop"] = ev.metric.drop(m["test_metric"], float_metric)
                                m["failures"] = check_budgets(p, m)
                            m["notes"] = platform_notes(p, m["conditions"].get("arch"))
                            if m["conditions"].get("emulated"):
                                m["emulated"] = True
                                m["notes"].append(f"emulated {m['conditions']['arch']} board "
                                                  f"({m['conditions']['emulated']}): outputs and accuracy are "
                                                  "its ARM kernels', latency is not the board's")
                        except PipelineError as e:
                            m = {"error": str(e), "failures": [str(e)]}
                        record(p.name, dev_spec, m)
                finally:
                    device.close()

            # Devices are measured in parallel, each on its own; a device's targets one after another. One
            # device runs in this thread, where a signal (Ctrl-C, SIGTERM) stops it at once.
            if len(devices) == 1:
                test_device(devices[0])
            else:
                with ThreadPoolExecutor(max_workers=len(devices)) as pool:
                    list(pool.map(test_device, devices))
    return {"results": results, "failed_targets": sorted(failed), "unreachable_devices": unreachable,
            "metric": ev.metric.name,
            "float_test_metric": float_metric}


def run(ctx, out: Path) -> dict:
    cfg = ctx.recipe.device_test
    profiles = [load_profile(t) for t in ctx.recipe.targets]
    res = measure_targets(ctx.stage_dir("lower"), ctx.metrics["lower"], profiles, ctx.recipe.devices, ctx.evaluator,
                       cfg.threads, cfg.runs, cfg.warmup, cfg.timeout_s, cfg.profile)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


STAGE = Stage("device-test", 6, ("teacher", "lower"), lambda r: {"devices": r.devices, **r.device_test.model_dump()},
              lambda r: bool(r.targets) and r.device_test.enabled, summary_keys=("float_test_metric",))
