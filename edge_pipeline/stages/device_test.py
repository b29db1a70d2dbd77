"""Stage 5: measure every lowered artifact on every device: size, latency, memory, accuracy.

The standalone runner goes to the device with the artifact and the evaluation inputs; the device returns a
JSON of timings and the outputs; accuracy and agreement with the fp32 teacher are computed here, on the host.
A device or target that fails is recorded with its error, and the others are still measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from edge_pipeline import progress
from edge_pipeline.devices import open_device, parse_device
from edge_pipeline.devices.runner import RUNNER_PATH
from edge_pipeline.errors import PipelineError
from edge_pipeline.targets import Profile, load_profile, platform_notes
from edge_pipeline.training import agreement, top1


def measure_on_device(device, artifact: Path, inputs_npz: Path, threads: int, runs: int,
                      warmup: int, pin: bool = False) -> tuple[dict, np.ndarray]:
    device.push([RUNNER_PATH, artifact, inputs_npz])
    argv = [device.python, RUNNER_PATH.name, artifact.name, inputs_npz.name, "result.json", "--threads", str(threads),
            "--runs", str(runs), "--warmup", str(warmup), "--outputs", "outputs.npz"] + (["--pin"] if pin else [])
    code, out, err = device.run(argv, f"run {artifact.name}")
    if code != 0:
        raise PipelineError(f"runner exited with {code} on {artifact.name}: {(err or out).strip()[-600:]}",
                            where=f"device {device.spec.spec}", exit_code=1,
                            hint="is the runtime installed there? (edge-pipeline doctor on the device)")
    with tempfile.TemporaryDirectory() as tmp:
        device.pull("result.json", Path(tmp) / "result.json")
        device.pull("outputs.npz", Path(tmp) / "outputs.npz")
        result = json.loads((Path(tmp) / "result.json").read_text())
        with np.load(Path(tmp) / "outputs.npz") as z:
            outputs = z["y"]
    return result, outputs


def accuracy_figures(outputs: np.ndarray, labels: np.ndarray | None, teacher: np.ndarray) -> dict:
    out = {"agreement_with_teacher": agreement(outputs, teacher)}
    if labels is not None:
        out["test_accuracy"] = top1(outputs, labels)
    return out


def check_budgets(profile: Profile, m: dict, reference_accuracy: float | None) -> list[str]:
    drop = None if reference_accuracy is None or "test_accuracy" not in m else reference_accuracy - m["test_accuracy"]
    return profile.budgets.violations(size_bytes=m["size_bytes"], accuracy_drop=drop, p50_ms=m["latency"]["p50_ms"])


def test_targets(lower_dir: Path, lower_metrics: dict, profiles: list[Profile], devices: list[str], x: np.ndarray,
                 labels: np.ndarray | None, teacher_out: np.ndarray, threads: int | None, runs: int, warmup: int,
                 timeout: float) -> dict:
    """Every target x device; returns {"results": {target: {device: metrics}}, "failed_targets": [...]}."""
    results: dict[str, dict] = {}
    failed: set[str] = set()
    reference = lower_metrics.get("float", {}).get("test_accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "eval_inputs.npz"
        np.savez(inputs, x=x)
        with progress.task("device tests", total=len(profiles) * len(devices)) as task:

            def record(target: str, device_spec: str, m: dict) -> None:
                results.setdefault(target, {})[device_spec] = m
                if "error" in m or m.get("failures"):
                    failed.add(target)
                task.advance()

            for dev_spec in devices:
                try:
                    device = open_device(parse_device(dev_spec), timeout)
                except PipelineError as e:
                    for p in profiles:
                        record(p.name, dev_spec, {"error": str(e)})
                    continue
                try:
                    for p in profiles:
                        task.advance(0, f"{p.name} on {dev_spec}")
                        tm = lower_metrics["targets"].get(p.name, {})
                        if "artifact" not in tm:
                            record(p.name, dev_spec, {"error": "not lowered"})
                            continue
                        try:
                            m, outputs = measure_on_device(device, lower_dir / tm["artifact"], inputs,
                                                           threads or p.threads, runs, warmup)
                            m.update(accuracy_figures(outputs, labels, teacher_out))
                            m["failures"] = check_budgets(p, m, reference)
                            m["notes"] = platform_notes(p, m["conditions"].get("arch"))
                        except PipelineError as e:
                            m = {"error": str(e), "failures": [str(e)]}
                        record(p.name, dev_spec, m)
                finally:
                    device.close()
    return {"results": results, "failed_targets": sorted(failed), "float_test_accuracy": reference}


def run(ctx, out: Path) -> dict:
    from edge_pipeline.modelio import load_model
    from edge_pipeline.training import predict

    cfg = ctx.recipe.device_test
    teacher, _ = load_model(ctx.stage_dir("teacher") / "model.pt")
    teacher_out = predict(teacher, ctx.data.test.x)
    lower_metrics = ctx.metrics["lower"]
    profiles = [load_profile(t) for t in ctx.recipe.targets]
    res = test_targets(ctx.stage_dir("lower"), lower_metrics, profiles, ctx.recipe.devices, ctx.data.test.x,
                       ctx.data.test.y, teacher_out, cfg.threads, cfg.runs,
                       cfg.warmup, cfg.timeout_s)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res
